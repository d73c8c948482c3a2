"""jobs.progress (bars on a terminal, plain lines in a log) and cli.next_steps (the commands
printed at the end of a run). Fast: no Ray, no MLflow."""

from __future__ import annotations

import io
import shlex
from pathlib import Path

from rich.console import Console

from cli import next_steps
from jobs.progress import StageProgress

LITE0 = "efficientnet/tf_efficientnet_lite0.in1k"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=60, force_terminal=False), out


def test_plain_lines_when_output_is_not_a_terminal():
    console, out = plain_console()
    clock = Clock()
    with StageProgress(console, clock=clock, interval=5.0, heartbeat=None) as p:
        assert p.plain
        p.extract(LITE0, 0, 3781)
        for done in (256, 512, 768):  # within 5 s of the start: no line
            clock.t += 1.0
            p.extract(LITE0, done, 3781)
        clock.t += 3.0                 # 6 s after the start
        p.extract(LITE0, 1200, 3781)
        clock.t += 1.0
        p.extract(LITE0, 1456, 3781)   # 1 s after the last line: none
        clock.t += 30.0
        p.extract(LITE0, 3781, 3781)
        p.extract("efficientnet/tf_efficientnet_lite1.in1k", 0, 0)
    lines = out.getvalue().splitlines()
    assert lines == [
        f"extract {LITE0}: started, 3781 images",
        f"extract {LITE0}: 1200/3781 images, 6.0 s (200.0 img/s)",
        f"extract {LITE0}: done, 3781/3781 images in 37.0 s (102.2 img/s)",
        "extract efficientnet/tf_efficientnet_lite1.in1k: nothing to compute (all cached)",
    ]
    # one line each, never wrapped at the console width (a log is read with grep)
    assert all(len(line) > 60 for line in lines[:3])


def test_sweep_total_may_shrink_at_the_end():
    console, out = plain_console()
    clock = Clock()
    with StageProgress(console, clock=clock, heartbeat=None) as p:
        p.sweep(0, 5)
        clock.t += 2
        p.sweep(1, 5)
        clock.t += 2
        p.sweep(3, 5)
        p.sweep(3, 3)  # the ensemble could not be made: the last call says so
        p.sweep(3, 3)  # and a repeat prints nothing more
    assert out.getvalue().splitlines() == ["sweep: started, 5 candidates",
                                           "sweep: done, 3/3 candidates in 4.0 s"]


def test_a_terminal_gets_bars_not_lines():
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=True)
    with StageProgress(console) as p:
        assert not p.plain
        p.extract(LITE0, 0, 10)
        p.extract(LITE0, 10, 10)
        p.extract("efficientnet/tf_efficientnet_lite1.in1k", 0, 0)
        p.sweep(0, 2)
        p.sweep(2, 2)
    text = out.getvalue()
    assert "started" not in text and "10/10" in text and "━" in text
    assert "cached  efficientnet/tf_efficientnet_lite1.in1k" in text


def test_next_commands_carry_the_runs_names_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(next_steps, "tlpipe_command", lambda: "tlpipe")
    monkeypatch.setattr(next_steps, "_opener", lambda: "xdg-open")
    image = tmp_path / "data" / "test" / "a cat" / "1.jpg"
    report = tmp_path / "state" / "sweeps" / "abc" / "report.html"
    cmds = [c for c, _ in next_steps.next_commands(
        "pets", tmp_path / "state", image=image, report=report, champion=None, challenger="1")]
    assert cmds == [
        "tlpipe promote pets --root state",
        "tlpipe serve --model pets@champion --root state",
        "tlpipe predict 'data/test/a cat/1.jpg' --model pets@challenger --root state",
        "tlpipe ui --root state",
        "xdg-open state/sweeps/abc/report.html",
    ]
    assert shlex.split(cmds[2])[2] == "data/test/a cat/1.jpg"
    # once the challenger is champion there is nothing to promote
    cmds = [c for c, _ in next_steps.next_commands("pets", "/elsewhere/state", champion="2",
                                                   challenger="2")]
    assert cmds == ["tlpipe serve --model pets@champion --root /elsewhere/state",
                    "tlpipe ui --root /elsewhere/state"]


def test_tlpipe_command_is_the_one_this_shell_reaches(monkeypatch, tmp_path):
    prefix = tmp_path / "venv"
    (prefix / "bin").mkdir(parents=True)
    script = prefix / "bin" / "tlpipe"
    script.write_text("#!/bin/sh\n")
    monkeypatch.setattr(next_steps.sys, "prefix", str(prefix))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(next_steps.shutil, "which", lambda name: None)
    assert next_steps.tlpipe_command() == "venv/bin/tlpipe"  # not on PATH: the script itself
    monkeypatch.setattr(next_steps.shutil, "which", lambda name: str(script))
    assert next_steps.tlpipe_command() == "tlpipe"           # activated
    other = tmp_path / "other-tlpipe"
    other.write_text("#!/bin/sh\n")
    monkeypatch.setattr(next_steps.shutil, "which", lambda name: str(other))
    assert next_steps.tlpipe_command() == "venv/bin/tlpipe"  # another install on PATH
    monkeypatch.chdir(Path("/"))
    assert next_steps.tlpipe_command() == str(script)


def test_printed_commands_are_single_unwrapped_lines(monkeypatch):
    monkeypatch.setattr(next_steps, "tlpipe_command", lambda: "tlpipe")
    out = io.StringIO()
    console = Console(file=out, width=40, force_terminal=False)
    cmds = next_steps.print_next_steps(console, "clothing-small", "/a/long/state/root/.tlpipe",
                                       champion="1", challenger="1")
    lines = out.getvalue().splitlines()
    assert lines[0] == "next:"
    # a shell snippet: "# what" above each command, nothing wrapped at the console's 40 columns
    assert lines[1:] == [line for cmd, why in cmds for line in (f"  # {why}", f"  {cmd}")]


def test_a_silent_stage_still_prints_where_it_stands():
    """A log never goes quiet for minutes: a stage with no news repeats its line."""
    import time

    console, out = plain_console()
    with StageProgress(console, interval=0.05, heartbeat=0.2) as p:
        p.sweep(0, 4)
        p.sweep(1, 4)
        time.sleep(0.6)  # no callback for 3 heartbeats
        p.sweep(4, 4)
    lines = out.getvalue().splitlines()
    assert lines[0] == "sweep: started, 4 candidates" and lines[-1].startswith("sweep: done, 4/4")
    beats = [line for line in lines if line.startswith("sweep: 1/4 candidates, ")]
    assert 1 <= len(beats) <= 4, lines


def test_report_without_an_opener_is_a_comment_not_a_command(monkeypatch):
    monkeypatch.setattr(next_steps, "_opener", lambda: None)
    cmd, why = next_steps.next_commands("pets", "/s", report="/s/sweeps/x/report.html")[-1]
    assert cmd == "" and why.endswith(": /s/sweeps/x/report.html")
