"""Progress reaches a log file while a pass runs, not only when it ends."""

import io

from rich.console import Console
from rich.progress import MofNCompleteColumn, TextColumn

from p2d.progress import Progress


def test_lines_while_running_when_output_is_not_a_terminal():
    out = io.StringIO()
    bar = Progress(TextColumn("{task.description}"), MofNCompleteColumn(), interval=0.0,
                   console=Console(file=out, force_terminal=False, width=80))
    with bar:
        task = bar.add_task("features", total=4)
        for n in range(1, 5):
            bar.advance(task)
            assert f"features {n}/4" in out.getvalue()  # printed as it happens


def test_a_terminal_gets_the_live_bar_only():
    out = io.StringIO()
    bar = Progress(TextColumn("{task.description}"), interval=0.0, auto_refresh=False,
                   console=Console(file=out, force_terminal=True, width=80))
    with bar:
        task = bar.add_task("features", total=2)
        bar.advance(task)
        assert "\n" not in out.getvalue().rstrip("\n")  # no extra lines besides the live display
