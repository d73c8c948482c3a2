"""Progress of long stages (extraction per backbone, the sweep): rich bars on a terminal, plain
lines when output goes to a file, a pipe or a job log.

A bar redrawn in place is what a terminal wants; in a log it shows nothing until everything has
ended (rich draws no live display when output is not a terminal), or thousands of control
sequences when forced. So when the console is not a terminal each stage prints one line when it
starts, a line such as

    extract efficientnet/tf_efficientnet_lite0.in1k: 1200/3781 images, 12.6 s (95.3 img/s)

at most every `interval` seconds while it runs (and, when nothing has moved for `heartbeat`
seconds, the same line again, so a log never goes silent for minutes), and one line when it ends.

    with StageProgress(console) as progress:
        run(..., on_progress=progress.extract, on_sweep_progress=progress.sweep)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

#: seconds between two plain progress lines of one stage
PLAIN_INTERVAL_S = 5.0
#: a stage that has printed nothing for this long prints where it stands (plain mode)
HEARTBEAT_S = 30.0


@dataclass
class _Stage:
    unit: str
    started: float = field(default_factory=time.monotonic)
    last_line: float = 0.0
    done: int = 0
    total: int = 0
    ended: bool = False
    task: Any = None  # the rich task id, in bar mode


def _rate(done: int, elapsed: float, unit: str) -> str:
    """`" (95.3 img/s)"` for images; nothing for units too slow for a rate (candidates)."""
    return f" ({done / elapsed:.1f} img/s)" if unit == "images" else ""


class StageProgress:
    """Per-stage progress on `console` (a rich Console): bars when it is a terminal, plain lines
    otherwise (`plain` forces either). `update(stage, done, total, unit)` is the whole interface;
    `extract` and `sweep` are the callbacks `jobs.run.run` and `jobs.extract.extract_features`
    take. Use it as a context manager: the bars live inside it."""

    def __init__(self, console=None, *, plain: bool | None = None,
                 interval: float = PLAIN_INTERVAL_S, heartbeat: float | None = HEARTBEAT_S,
                 clock: Callable[[], float] = time.monotonic):
        if console is None:
            from rich.console import Console

            console = Console()
        self.console = console
        self.plain = (not console.is_terminal) if plain is None else plain
        self.interval = interval
        self.clock = clock
        self.heartbeat = heartbeat
        self.stages: dict[str, _Stage] = {}
        self._bars = None
        self._lock = threading.Lock()  # callbacks and the heartbeat thread
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ---- context
    def __enter__(self) -> "StageProgress":
        if not self.plain:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)

            self._bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[unit]}"), TimeRemainingColumn(),
                                  console=self.console)
            self._bars.__enter__()
        elif self.heartbeat:
            self._beat = threading.Thread(target=self._heartbeat, name="tlpipe-progress", daemon=True)
            self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bars is not None:
            self._bars.__exit__(*exc)
            self._bars = None
        if self._beat is not None:
            self._stop.set()
            self._beat.join()
            self._beat = None

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(self.interval, self.heartbeat)):
            with self._lock:
                now = self.clock()
                for stage, st in self.stages.items():
                    if not st.ended and now - st.last_line >= self.heartbeat:
                        self._progress_line(stage, st, now)

    # ---- callbacks
    def extract(self, backbone: str, done: int, total: int) -> None:
        """`on_progress` of extraction: images of one backbone (total 0: everything was cached)."""
        self.update(f"extract {backbone}", done, total, "images")

    def sweep(self, done: int, total: int) -> None:
        """`on_sweep_progress` of the sweep: candidates (backbone × head) scored and logged."""
        self.update("sweep", done, total, "candidates")

    def update(self, stage: str, done: int, total: int, unit: str = "items") -> None:
        with self._lock:
            self._update(stage, done, total, unit)

    def _update(self, stage: str, done: int, total: int, unit: str) -> None:
        now = self.clock()
        st = self.stages.get(stage)
        new = st is None
        if new:
            st = self.stages[stage] = _Stage(unit, started=now, last_line=now)
        st.done, st.total = int(done), int(total)
        if self._bars is not None:
            self._bar(stage, st, new)
            return
        if new:
            self._line(f"{stage}: nothing to compute (all cached)" if st.total == 0 and st.unit == "images"
                       else f"{stage}: started, {st.total} {st.unit}")
            if st.total == 0:
                st.ended = True
            return
        if st.done >= st.total:  # (0, 0) after a start: everything planned was skipped
            if not st.ended:
                self._end_line(stage, st)
            return
        st.ended = False  # a total that grew reopens the stage
        if now - st.last_line >= self.interval:
            self._progress_line(stage, st, now)

    # ---- output
    def _progress_line(self, stage: str, st: _Stage, now: float) -> None:
        st.last_line = now
        elapsed = max(now - st.started, 1e-9)
        self._line(f"{stage}: {st.done}/{st.total} {st.unit}, {elapsed:.1f} s"
                   + _rate(st.done, elapsed, st.unit))

    def _end_line(self, stage: str, st: _Stage) -> None:
        st.ended = True
        elapsed = max(self.clock() - st.started, 1e-9)
        self._line(f"{stage}: done, {st.done}/{st.total} {st.unit} in {elapsed:.1f} s"
                   + _rate(st.done, elapsed, st.unit))

    def _line(self, text: str) -> None:
        from rich.text import Text

        # Text, not markup (backbone names may hold brackets); soft_wrap: one line in a log,
        # whatever the console width. rich flushes after each print, so a pipe sees it at once.
        self.console.print(Text(text), soft_wrap=True, highlight=False)

    def _bar(self, stage: str, st: _Stage, new: bool) -> None:
        if new:
            cached = st.total == 0 and st.unit == "images"
            st.task = self._bars.add_task(stage.replace("extract ", "cached  ", 1) if cached else stage,
                                          total=max(st.total, 1), unit=st.unit)
        self._bars.update(st.task, total=max(st.total, 1),
                          completed=st.done if st.total else 1)
