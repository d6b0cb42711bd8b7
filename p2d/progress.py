"""Progress that shows up wherever the output goes: rich's live bar on a terminal, a line every
`interval` seconds when output is a file or a pipe (rich alone prints there only when a pass ends)."""

from __future__ import annotations

import time

from rich import progress as rp


class Progress(rp.Progress):
    def __init__(self, *columns, interval: float = 30.0, **kwargs):
        super().__init__(*columns, **kwargs)
        self.interval, self._last = interval, time.monotonic()

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._line()

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._line()

    def _line(self) -> None:
        if self.disable or self.console.is_terminal or time.monotonic() - self._last < self.interval:
            return
        self._last = time.monotonic()
        self.console.print(self.make_tasks_table(self.tasks))
