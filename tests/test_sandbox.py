"""Generated code runs confined: no writes outside its directory, no sockets out, no shell commands."""

import socket
import textwrap

import pytest

from p2d import P2DError
from p2d.evaluate import run_program
from p2d.sandbox import available

landlock = pytest.mark.skipif(not available(), reason="this kernel has no Landlock")


@landlock
def test_writing_outside_its_directory_fails(tmp_path):
    target = tmp_path / "escaped.txt"
    program = f"open({str(target)!r}, 'w').write('x')\n"
    assert run_program(program).startswith("failed: PermissionError")
    assert not target.exists()
    assert run_program("open('inside.txt', 'w').write('x')\nassert open('inside.txt').read() == 'x'\n") == "passed"


@landlock
def test_connecting_a_socket_fails():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        result = run_program(program)
        assert result.startswith("failed") and "Error" in result
        server.settimeout(0.5)
        with pytest.raises(socket.timeout):
            server.accept()  # nothing reached the listener


@landlock
def test_shell_commands_through_ctypes_fail(tmp_path):
    marker = tmp_path / "ran"
    program = textwrap.dedent(f"""
        import ctypes
        rc = ctypes.CDLL(None).system(b"touch {marker}")
        assert rc == 0, rc
    """)
    assert run_program(program).startswith("failed")
    assert not marker.exists()
    # the same program unconfined does run the command: the sandbox is what stops it
    assert run_program(program, unsafe=True) == "passed" and marker.exists()


def test_refuses_without_a_sandbox(monkeypatch):
    monkeypatch.setattr("p2d.sandbox.available", lambda: False)
    with pytest.raises(P2DError, match="--unsafe-exec"):
        run_program("pass\n")
