"""The capture writer on real photos: bounded by bytes and age, atomic under a killed process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from deploy.capture import TMP_PREFIX, CaptureRecord, CaptureWriter, read_captures


def _photos(cifar10_dir: Path, n: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted((cifar10_dir / "test" / "cat").glob("*.jpg"))[:n]]


def _drain(writer: CaptureWriter, n: int, timeout: float = 20.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = writer.stats()
        if s["written"] + s["dropped_write_error"] >= n and s["queued"] == 0:
            return s
        time.sleep(0.02)
    raise AssertionError(f"the capture writer did not finish: {writer.stats()}")


def test_bounded_by_bytes_and_age(cifar10_dir, tmp_path):
    photos = _photos(cifar10_dir, 12)
    now = [1_000_000.0]
    writer = CaptureWriter(str(tmp_path), max_bytes=10_000, max_age_s=60.0, clock=lambda: now[0])
    try:
        for i, data in enumerate(photos):
            now[0] += 1.0
            assert writer.offer(CaptureRecord(data, np.full(8, i, np.float32), {"decision": "abstain", "i": i}))
            _drain(writer, i + 1)
        s = writer.stats()
        assert s["bytes"] <= 10_000 and s["evicted"] > 0 and s["records"] + s["evicted"] == len(photos)
        records, _ = read_captures(str(tmp_path))
        kept = [r.meta["i"] for r in records]
        assert kept == list(range(len(photos) - len(kept), len(photos)))  # the oldest went first
        for r in records:
            assert Path(r.image_path).read_bytes() == photos[r.meta["i"]] and r.embedding[0] == r.meta["i"]
        now[0] += 120.0  # every record is older than max_age_s now: the next write evicts them
        writer.offer(CaptureRecord(photos[0], np.zeros(8, np.float32), {"decision": "abstain", "i": 99}))
        _drain(writer, len(photos) + 1)
        assert [r.meta["i"] for r in read_captures(str(tmp_path))[0]] == [99]
    finally:
        writer.close()


def test_killed_writer_leaves_only_complete_records(cifar10_dir, tmp_path):
    """SIGKILL in the middle of writing: every record that exists is whole; a new writer starts
    from them and clears the temporary files."""
    src = sorted((cifar10_dir / "test" / "cat").glob("*.jpg"))[0]
    out = tmp_path / "capture"
    code = textwrap.dedent(f"""
        import numpy as np
        from deploy.capture import CaptureRecord, CaptureWriter
        w = CaptureWriter({str(out)!r}, max_bytes=10**9, max_age_s=1e9, queue_size=10_000)
        data = open({str(src)!r}, "rb").read()
        i = 0
        while True:
            if w.offer(CaptureRecord(data, np.full(16, i, np.float32), {{"i": i}})):
                i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        def committed() -> int:  # pathlib's glob also matches the writer's hidden .tmp- JSON
            return sum(not p.name.startswith(TMP_PREFIX) for p in out.glob("*.json"))

        deadline = time.time() + 60
        while time.time() < deadline and committed() < 30:
            time.sleep(0.05)
        assert committed() >= 30, "the writer wrote nothing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    records, _ = read_captures(str(out))
    assert len(records) >= 30
    data = src.read_bytes()
    for r in records:
        assert Path(r.image_path).read_bytes() == data and r.embedding.shape == (16,)
        assert np.all(r.embedding == r.meta["i"])
    # a new writer indexes exactly the complete records (and removes stale temporary files)
    for leftover in out.glob(f"{TMP_PREFIX}*"):
        os.utime(leftover, (time.time() - 3600, time.time() - 3600))
    writer = CaptureWriter(str(out), max_bytes=10**9, max_age_s=1e9)
    try:
        assert writer.stats()["records"] == len(records)
        assert not list(out.glob(f"{TMP_PREFIX}*"))
    finally:
        writer.close()
