"""`cli.quick_exit`: the process ends with the status `sys.exit` would give, after what a normal
exit guarantees (other threads finished, atexit handlers run, output flushed)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from cli.quick_exit import exit_status

SCRIPT = textwrap.dedent("""
    import atexit, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    from cli.quick_exit import run_and_exit

    out = Path(sys.argv[1])
    pool = ThreadPoolExecutor(1)          # an idle pool worker (non-daemon) must not block the exit
    pool.submit(lambda: None).result()

    def late():                           # a non-daemon thread still working when main returns
        time.sleep(0.3)
        (out / "thread").write_text("done")

    threading.Thread(target=late).start()
    atexit.register(lambda: (out / "atexit").write_text("ran"))

    def main():
        sys.stdout.write("unflushed output")   # no newline, no flush
        code = sys.argv[2]
        sys.exit(None if code == "none" else int(code) if code.lstrip("-").isdigit() else code)

    run_and_exit(main)
""")


@pytest.mark.parametrize("code, status", [("none", 0), ("0", 0), ("3", 3), ("bad input", 1)])
def test_status_threads_atexit_and_output(tmp_path, code, status):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), code], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "unflushed output"
    assert (tmp_path / "thread").read_text() == "done"  # waited for, as a normal exit does
    assert (tmp_path / "atexit").read_text() == "ran"
    if code == "bad input":
        assert proc.stderr.strip() == "bad input"


def test_exit_status_follows_sys_exit(capsys):
    assert exit_status(None) == 0 and exit_status(0) == 0 and exit_status(4) == 4
    assert exit_status("message") == 1
    assert capsys.readouterr().err.strip() == "message"


def test_the_tlpipe_command_exits_with_its_status():
    ok = subprocess.run([sys.executable, "-m", "cli.app", "--help"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0 and "run" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "cli.app", "no-such-command"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "No such command" in bad.stderr
