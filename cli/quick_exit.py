"""Ending the `tlpipe` process without the interpreter's teardown.

A finished command has torch, Ray, MLflow, OpenVINO and FAISS loaded; Python's own exit then
tears down every module and runs the extensions' C++ destructors (torch deregisters each of its
operators), seconds of CPU that change nothing for a process about to end. `quick_exit` does
what a normal exit guarantees — other non-daemon threads finished, `atexit` handlers run (Ray's
shutdown, logging's flush, temporary files), standard streams flushed — then ends the process.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Any, NoReturn


def exit_status(code: Any) -> int:
    """The status `sys.exit(code)` ends with: None is 0, an int itself, anything else is printed
    to stderr and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def quick_exit(code: Any = 0) -> NoReturn:
    """End the process with `exit_status(code)`, after the first two steps of the interpreter's
    own exit, in its order: wait for the non-daemon threads (thread pools are told to stop first),
    then run the `atexit` handlers."""
    status = exit_status(code)
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to deliver
            pass
    os._exit(status)


def run_and_exit(main: Any) -> NoReturn:
    """Call `main()` (a Click / Typer app raises SystemExit with its status), then `quick_exit`."""
    try:
        main()
    except SystemExit as exc:
        quick_exit(exc.code)
    quick_exit(0)
