"""Ray tasks run in priority order, a bounded number at a time.

Ray starts queued tasks roughly in submission order and has no priorities, so a task that only
becomes possible late in a sweep (the head on concatenated backbones, which needs every backbone's
linear probe first) would wait behind every task queued before it, then run alone while the other
CPUs idle. `TaskQueue` keeps the waiting tasks itself and submits, best rank first, only as many
as the Ray runs at once; a slot that frees is refilled before the finished task's result is
handled (logged), and after the jobs that result makes possible are queued. Tasks come in groups (one feature set's heads, sharing data put in the object store
once); a few groups are opened at a time so that only their data sits in the object store.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable


@dataclass(frozen=True)
class Job:
    """One task to submit: `send()` submits it and returns (object ref, what the caller keeps for
    its result); lower `rank` is submitted first; `tag` is what `waiting` matches."""

    rank: int
    send: Callable[[], tuple[Any, Any]]
    tag: Any = None


@dataclass(order=True)
class _Entry:
    rank: int
    seq: int
    job: Job = field(compare=False)
    group: int = field(compare=False)


class TaskQueue:
    """`slots`: tasks submitted at a time (None: every job as soon as its group opens);
    `max_open`: groups whose jobs are queued or running at a time."""

    def __init__(self, slots: int | None, max_open: int):
        if slots is not None and slots < 1:
            raise ValueError(f"slots must be >= 1 or None, got {slots}")
        self.slots = slots
        self.max_open = max(1, int(max_open))
        self._unopened: list[Callable[[], list[Job]]] = []
        self._ready: list[_Entry] = []  # heap
        self._running: dict[Any, tuple[Any, Job, int]] = {}  # ref -> (kept, job, group)
        self._seq = itertools.count()
        self._groups = itertools.count()

    @property
    def running(self) -> int:
        """Tasks submitted and not yet received."""
        return len(self._running)

    @property
    def busy(self) -> bool:
        """Whether any job is unopened, queued or running."""
        return bool(self._unopened or self._ready or self._running)

    def waiting(self, match: Callable[[Any], bool]) -> bool:
        """Whether a group is unopened, or a queued or running job's tag matches."""
        return bool(self._unopened) or any(match(e.job.tag) for e in self._ready) or any(
            match(job.tag) for _, job, _ in self._running.values())

    def run(self, groups: Iterable[Callable[[], list[Job]]], receive: Callable[[Any, Any], None],
            handle: Callable[[Any], None],
            later: Callable[[], list[Callable[[], list[Job]]]] | None = None) -> None:
        """Open `groups` (each call returns its jobs) a few at a time and run their jobs. As each
        task finishes: `receive(kept, ref)` (quick: `ray.get(ref)` raises what the task raised),
        the groups `later()` returns open, the freed slot is refilled, then `handle(kept)` (the
        slow part, e.g. logging) while that task runs. A failure in here cancels what runs."""
        import ray

        self._unopened = list(groups)
        try:
            while self.busy:
                self._fill()
                if not self._running:
                    continue
                (ref,), _ = ray.wait(list(self._running), num_returns=1)
                kept, _job, _group = self._running.pop(ref)
                receive(kept, ref)
                for group in (later() if later else []):
                    self._add(group())
                self._fill()
                handle(kept)
        except BaseException:
            # force: a head's fit runs in native code that a polite cancel does not interrupt,
            # and nothing of a task is wanted once the run is failing
            for ref in self._running:
                ray.cancel(ref, force=True)
            raise

    def _add(self, jobs: list[Job]) -> None:
        group = next(self._groups)
        for job in jobs:
            heapq.heappush(self._ready, _Entry(job.rank, next(self._seq), job, group))

    def _fill(self) -> None:
        while self._unopened and len(self._open_groups()) < self.max_open:
            self._add(self._unopened.pop(0)())
        while self._ready and (self.slots is None or len(self._running) < self.slots):
            entry = heapq.heappop(self._ready)
            ref, kept = entry.job.send()
            self._running[ref] = (kept, entry.job, entry.group)

    def _open_groups(self) -> set[int]:
        return {e.group for e in self._ready} | {g for _, _, g in self._running.values()}
