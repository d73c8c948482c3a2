"""FeatureStore: round trips, dedupe, concurrency, crash leftovers, ls / verify / gc / compact."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from feature_store import FeatureStore, ShardCorruptError
from feature_store.shards import (
    TEMP_PREFIX,
    embedding_checksum,
    read_embeddings,
    read_header,
    write_shard,
)

REPO = Path(__file__).resolve().parents[2]
FP = "fp-" + "a" * 20
FP2 = "fp-" + "b" * 20
D = 16


def keys_for(ids) -> list[str]:
    return [hashlib.sha256(f"img-{i}".encode()).hexdigest() for i in ids]


def emb_for(ids, dim: int = D) -> np.ndarray:
    """A deterministic embedding per image id, so overlapping writers write identical rows."""
    return np.stack([np.random.default_rng(int(i)).standard_normal(dim, dtype=np.float32)
                     for i in ids])


def shard_paths(root: Path, fp: str = FP) -> list[Path]:
    return sorted((root / fp).glob("shard-*.parquet"))


@pytest.fixture(params=["local", "file-url", "memory"])
def store_url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "features")
    elif request.param == "file-url":
        yield f"file://{tmp_path}/features"
    else:
        name = f"tlpipe-test-{uuid.uuid4().hex}"
        yield f"memory://{name}/features"
        fsspec.filesystem("memory").rm(f"/{name}", recursive=True)


def test_round_trip_on_every_filesystem(store_url):
    store = FeatureStore(store_url)
    ids = np.arange(50)
    p1 = store.put(FP, keys_for(ids[:30]), emb_for(ids[:30]), meta={"backbone": "toy/net", "engine": "onnx"})
    p2 = store.put(FP, keys_for(ids[30:]), emb_for(ids[30:]))
    assert p1 and p2 and p1 != p2
    order = np.array([7, 42, 0, 7, 49, 31])  # mixed shards, repeats allowed
    got = FeatureStore(store_url).get(FP, keys_for(order))  # a fresh reader
    assert got.dtype == np.float32 and got.shape == (len(order), D)
    np.testing.assert_array_equal(got, emb_for(order))
    np.testing.assert_array_equal(store.get(FP, keys_for(ids)), emb_for(ids))
    assert store.get(FP, []).shape == (0, D)
    [info] = store.ls()
    assert (info.fingerprint, info.backbone, info.engine, info.dim, info.rows, info.shards) == \
        (FP, "toy/net", "onnx", D, 50, 2)
    assert info.bytes > 50 * D * 4 and info.created and info.updated and info.problems == 0
    assert store.verify(FP).ok


def test_shard_records_its_rows_and_checksum(tmp_path):
    store = FeatureStore(tmp_path)
    extract_meta = {"backbone": "toy/net", "engine": "onnx", "dim": D, "dtype": "float32", "device": "cpu"}
    path = store.put(FP, keys_for(range(5)), emb_for(range(5)), meta=extract_meta)
    h = read_header(store.fs, path)
    assert h.rows == 5 and h.dim == D and h.fingerprint == FP and h.meta["backbone"] == "toy/net"
    assert h.embedding_sha256 == hashlib.sha256(emb_for(range(5)).astype("<f4").tobytes()).hexdigest()
    meta = json.loads((tmp_path / FP / "meta.json").read_text())
    assert {k: meta[k] for k in ("backbone", "engine", "device", "dim", "dtype", "fingerprint")} == \
        {"backbone": "toy/net", "engine": "onnx", "device": "cpu", "dim": D, "dtype": "float32",
         "fingerprint": FP}
    assert "created" in meta


def test_contains_missing_and_key_errors(tmp_path):
    store = FeatureStore(tmp_path)
    store.put(FP, keys_for(range(10)), emb_for(range(10)))
    ks = keys_for([3, 11, 4, 12, 11])
    assert store.contains(FP, ks).tolist() == [True, False, True, False, False]
    assert store.missing(FP, ks) == keys_for([11, 12])  # distinct, first-seen order
    assert store.missing(FP2, ks) == keys_for([3, 11, 4, 12])
    assert not store.contains(FP2, ks).any()
    with pytest.raises(KeyError, match=r"2 distinct key\(s\) \(3 of 5 requested\).*first missing: " + ", ".join(keys_for([11, 12]))):
        store.get(FP, ks)
    with pytest.raises(KeyError, match="no feature set"):
        store.get(FP2, ks)
    with pytest.raises(TypeError, match="single string"):
        store.contains(FP, keys_for([1])[0])
    with pytest.raises(ValueError, match="fingerprint"):
        store.contains("../escape", ks)


def test_reput_stores_only_new_keys(tmp_path):
    store = FeatureStore(tmp_path)
    store.put(FP, keys_for(range(10)), emb_for(range(10)))
    path = store.put(FP, keys_for(range(5, 15)), emb_for(range(5, 15)))
    h = read_header(store.fs, path)
    assert h.rows == 5  # only ids 10..14 were new
    assert store.put(FP, keys_for(range(15)), emb_for(range(15))) is None
    assert len(shard_paths(tmp_path)) == 2
    np.testing.assert_array_equal(store.get(FP, keys_for(range(15))), emb_for(range(15)))


def test_put_validates_inputs(tmp_path):
    store = FeatureStore(tmp_path)
    ks = keys_for(range(3))
    with pytest.raises(ValueError, match=r"shape \(len\(keys\), dim\) = \(3, D\)"):
        store.put(FP, ks, np.zeros((2, D), np.float32))
    with pytest.raises(ValueError, match="shape"):
        store.put(FP, ks, np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="floating point"):
        store.put(FP, ks, np.zeros((3, D), np.int64))
    bad = emb_for(range(3))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=f"NaN/inf .*row 1, key {ks[1]}"):
        store.put(FP, ks, bad)
    with pytest.raises(ValueError, match="sha256 hex"):
        store.put(FP, ["not-a-hash", *ks[1:]], emb_for(range(3)))
    with pytest.raises(ValueError, match="appears twice"):
        store.put(FP, [ks[0], ks[0]], emb_for(range(2)))
    with pytest.raises(ValueError, match="meta says dim"):
        store.put(FP, ks, emb_for(range(3)), meta={"dim": D + 1})
    assert not (tmp_path / FP).exists()  # nothing was written by the failed puts
    # float64 is accepted (stored as float32); an identical duplicate row is deduped
    path = store.put(FP, [ks[0], ks[1], ks[0]], emb_for([0, 1, 0]).astype(np.float64))
    assert read_header(store.fs, path).rows == 2
    with pytest.raises(ValueError, match=f"holds dim {D}"):
        store.put(FP, keys_for([5]), emb_for([5], dim=D + 1))


def test_concurrent_threads_disjoint_and_overlapping(tmp_path):
    store = FeatureStore(tmp_path)
    ranges = [range(0, 60), range(40, 100), range(80, 140), range(0, 140, 7)]
    errors = []
    start = threading.Barrier(len(ranges))  # all first puts (and meta.json writes) race

    def writer(ids):
        try:
            ids = list(ids)
            start.wait()
            for i in range(0, len(ids), 15):
                store.put(FP, keys_for(ids[i:i + 15]), emb_for(ids[i:i + 15]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(r,)) for r in ranges]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    fresh = FeatureStore(tmp_path)
    np.testing.assert_array_equal(fresh.get(FP, keys_for(range(140))), emb_for(range(140)))
    assert not list((tmp_path / FP).glob(TEMP_PREFIX + "*"))
    assert fresh.verify(FP).ok


_WRITER = textwrap.dedent("""
    import sys, hashlib, numpy as np
    from feature_store import FeatureStore
    root, fp, lo, hi = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = FeatureStore(root)
    for start in range(lo, hi, 10):
        ids = range(start, min(start + 10, hi))
        keys = [hashlib.sha256(f"img-{i}".encode()).hexdigest() for i in ids]
        emb = np.stack([np.random.default_rng(i).standard_normal(%d, dtype=np.float32) for i in ids])
        store.put(fp, keys, emb, meta={"backbone": "toy/net"})
""" % D)


def test_concurrent_processes_disjoint_and_overlapping(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    spans = [(0, 50), (30, 80), (60, 110)]
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), FP, str(lo), str(hi)],
                              env=env, stderr=subprocess.PIPE, text=True) for lo, hi in spans]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    store = FeatureStore(tmp_path)
    np.testing.assert_array_equal(store.get(FP, keys_for(range(110))), emb_for(range(110)))
    report = store.verify(FP)
    assert report.ok and report.rows == 110 and not report.temp_files
    # overlapping writers may both store a key; readers take one copy, compaction drops the rest
    store.compact(FP)
    assert len(shard_paths(tmp_path)) == 1
    assert store.verify(FP).duplicate_rows == 0
    np.testing.assert_array_equal(store.get(FP, keys_for(range(110))), emb_for(range(110)))


_KILLED_WRITER = textwrap.dedent("""
    import sys, hashlib, numpy as np
    from feature_store import FeatureStore
    store = FeatureStore(sys.argv[1])
    for batch in range(10_000):
        ids = range(batch * 500, batch * 500 + 500)
        keys = [hashlib.sha256(f"img-{i}".encode()).hexdigest() for i in ids]
        emb = np.stack([np.full(512, i, dtype=np.float32) for i in ids])
        store.put(sys.argv[2], keys, emb)
""")


def test_killed_writer_never_leaves_a_shard_that_reads_back_wrong(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path), FP],
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while len(shard_paths(tmp_path)) < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, "writer exited early"
            time.sleep(0.01)
    finally:
        proc.kill()  # SIGKILL: no cleanup handlers run, wherever it was
        proc.wait()
    store = FeatureStore(tmp_path)
    report = store.verify(FP)
    assert report.ok and len(report.ok_shards) >= 3 and report.rows == 500 * len(report.ok_shards)
    ids = np.arange(report.rows)
    got = store.get(FP, keys_for(ids))
    np.testing.assert_array_equal(got, np.repeat(ids[:, None], 512, axis=1).astype(np.float32))
    store.gc(temp_grace_s=0)
    assert not list((tmp_path / FP).glob(TEMP_PREFIX + "*"))


def test_failed_write_leaves_no_shard_and_no_temp(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    store = FeatureStore(tmp_path)
    store.put(FP, keys_for(range(3)), emb_for(range(3)))

    def broken_write(table, where, **kw):
        where.write(b"PAR1 partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        store.put(FP, keys_for(range(3, 6)), emb_for(range(3, 6)))
    assert len(shard_paths(tmp_path)) == 1
    assert not list((tmp_path / FP).glob(TEMP_PREFIX + "*"))
    assert store.missing(FP, keys_for(range(6))) == keys_for(range(3, 6))


def _flip(path: Path, needle: bytes, replacement: bytes) -> None:
    data = path.read_bytes()
    at = data.find(needle)
    assert at >= 0, "bytes to corrupt not found in the shard"
    path.write_bytes(data[:at] + replacement + data[at + len(replacement):])


def _crash_leftovers(store: FeatureStore, root: Path) -> dict[str, Path]:
    """One good shard plus what crashes / bit rot leave behind, each holding distinct keys."""
    good = Path(store.put(FP, keys_for(range(10)), emb_for(range(10))))
    fs = store.fs
    d = str(root / FP)
    trunc = Path(write_shard(fs, d, keys_for(range(10, 20)), emb_for(range(10, 20)), fingerprint=FP))
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    bad_emb = Path(write_shard(fs, d, keys_for(range(20, 30)), emb_for(range(20, 30)), fingerprint=FP))
    row = emb_for([23])[0].astype("<f4").tobytes()
    _flip(bad_emb, row[:8], bytes(8))
    bad_keys = Path(write_shard(fs, d, keys_for(range(30, 40)), emb_for(range(30, 40)), fingerprint=FP))
    k = keys_for([31])[0].encode()
    _flip(bad_keys, k, (b"0" if k[:1] != b"0" else b"1") + k[1:])
    temp = root / FP / f"{TEMP_PREFIX}shard-killed-midway.parquet"
    temp.write_bytes(good.read_bytes()[:100])
    return {"good": good, "trunc": trunc, "bad_emb": bad_emb, "bad_keys": bad_keys, "temp": temp}


def test_crash_leftovers_are_ignored_reported_and_collected(tmp_path, caplog):
    writer = FeatureStore(tmp_path)
    files = _crash_leftovers(writer, tmp_path)
    store = FeatureStore(tmp_path)
    mask = store.contains(FP, keys_for(range(40)))
    # good keys present; truncated / key-corrupted shards skipped at index time
    assert mask[:10].all() and not mask[10:20].any() and not mask[30:40].any()
    np.testing.assert_array_equal(store.get(FP, keys_for(range(10))), emb_for(range(10)))
    # the embedding corruption is only visible in the bytes: caught by the checksum on read
    with pytest.raises(KeyError, match="skipped as corrupt"):
        store.get(FP, keys_for([21]))
    assert not store.contains(FP, keys_for(range(20, 30))).any()
    assert "skipping shard" in caplog.text
    problems = store.problems(FP)
    assert set(problems) == {str(files[n]) for n in ("trunc", "bad_emb", "bad_keys", "temp")}

    report = store.verify(FP)
    assert not report.ok
    assert set(report.corrupt) == {str(files[n]) for n in ("trunc", "bad_emb", "bad_keys")}
    assert "checksum" in report.corrupt[str(files["bad_emb"])]
    assert "checksum" in report.corrupt[str(files["bad_keys"])]
    assert report.temp_files == [str(files["temp"])] and report.ok_shards == [str(files["good"])]

    # a young temp file may be a write in flight: kept by default, removed once past the grace
    dry = store.gc(dry_run=True)
    assert dry.removed_temp == [] and len(dry.removed_corrupt) == 3
    assert all(p.exists() for p in files.values())
    rep = store.gc(temp_grace_s=0)
    assert rep.removed_temp == [str(files["temp"])] and len(rep.removed_corrupt) == 3
    assert rep.bytes_freed > 0
    assert sorted((tmp_path / FP).iterdir()) == sorted([files["good"], tmp_path / FP / "meta.json"])
    fresh = FeatureStore(tmp_path)
    assert fresh.verify(FP).ok and fresh.problems(FP) == {}
    # re-extracting the lost keys works afterwards
    fresh.put(FP, keys_for(range(40)), emb_for(range(40)))
    np.testing.assert_array_equal(fresh.get(FP, keys_for(range(40))), emb_for(range(40)))


def test_read_embeddings_detects_corruption_directly(tmp_path):
    store = FeatureStore(tmp_path)
    path = Path(store.put(FP, keys_for(range(4)), emb_for(range(4))))
    _flip(path, emb_for([2])[0].astype("<f4").tobytes()[:4], b"\x00\x00\x80\x7f")
    h = read_header(store.fs, str(path))
    with pytest.raises(ShardCorruptError, match="embedding checksum mismatch"):
        read_embeddings(store.fs, h)
    assert embedding_checksum(read_embeddings(store.fs, h, verify=False)) != h.embedding_sha256


def test_crash_leftovers_on_memory_fs():
    root = f"memory://tlpipe-test-{uuid.uuid4().hex}/features"
    fs, path = fsspec.core.url_to_fs(root)
    try:
        store = FeatureStore(root)
        store.put(FP, keys_for(range(5)), emb_for(range(5)))
        with fs.open(f"{path}/{FP}/{TEMP_PREFIX}shard-x.parquet", "wb") as f:
            f.write(b"PAR1 half a shard")
        with fs.open(f"{path}/{FP}/shard-00000000T000000000000Z-deadbeef.parquet", "wb") as f:
            f.write(b"PAR1 not really parquet")
        np.testing.assert_array_equal(FeatureStore(root).get(FP, keys_for(range(5))), emb_for(range(5)))
        report = store.verify(FP)
        assert len(report.corrupt) == 1 and len(report.temp_files) == 1
        rep = store.gc(temp_grace_s=0)
        assert len(rep.removed_corrupt) == 1 and len(rep.removed_temp) == 1
        assert store.verify(FP).ok and not store.verify(FP).temp_files
    finally:
        fs.rm(f"/{path.strip('/').split('/')[0]}", recursive=True)


def test_index_cache_sees_shards_written_by_others(tmp_path):
    reader = FeatureStore(tmp_path)
    other = FeatureStore(tmp_path)
    assert not reader.contains(FP, keys_for([1])).any()
    other.put(FP, keys_for(range(5)), emb_for(range(5)))
    assert reader.contains(FP, keys_for(range(5))).all()
    reader.get(FP, keys_for(range(5)))  # caches embeddings of the first shard
    other.put(FP, keys_for(range(5, 9)), emb_for(range(5, 9)))
    np.testing.assert_array_equal(reader.get(FP, keys_for(range(9))), emb_for(range(9)))
    other.compact(FP)  # shards replaced under the reader: its cache must not serve stale files
    assert len(shard_paths(tmp_path)) == 1
    np.testing.assert_array_equal(reader.get(FP, keys_for(range(9))), emb_for(range(9)))
    assert reader.ls()[0].shards == 1


def test_compact_merges_shards_and_tolerates_duplicates(tmp_path):
    store = FeatureStore(tmp_path)
    for lo in range(0, 30, 10):
        store.put(FP, keys_for(range(lo, lo + 10)), emb_for(range(lo, lo + 10)))
    # what two overlapping writers leave: the same keys in two shards
    write_shard(store.fs, str(tmp_path / FP), keys_for(range(5, 15)), emb_for(range(5, 15)), fingerprint=FP)
    assert len(shard_paths(tmp_path)) == 4
    np.testing.assert_array_equal(store.get(FP, keys_for(range(30))), emb_for(range(30)))
    assert store.verify(FP).duplicate_rows == 10
    new = store.compact(FP)
    assert shard_paths(tmp_path) == [Path(new)] and read_header(store.fs, new).rows == 30
    np.testing.assert_array_equal(FeatureStore(tmp_path).get(FP, keys_for(range(30))), emb_for(range(30)))
    assert store.compact(FP) == new  # one shard, nothing to drop: a no-op


def test_ls_and_gc_keep_fingerprints(tmp_path):
    store = FeatureStore(tmp_path)
    store.put(FP, keys_for(range(6)), emb_for(range(6)), meta={"backbone": "b/one"})
    store.put(FP2, keys_for(range(4)), emb_for(range(4), dim=8), meta={"backbone": "a/two"})
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a feature set")
    infos = store.ls()
    assert [(i.backbone, i.fingerprint, i.dim, i.rows, i.shards) for i in infos] == \
        [("a/two", FP2, 8, 4, 1), ("b/one", FP, D, 6, 1)]

    dry = store.gc(keep_fingerprints=[FP], dry_run=True)
    assert dry.removed_sets == [FP2] and dry.bytes_freed > 0 and (tmp_path / FP2).exists()
    rep = store.gc(keep_fingerprints=[FP])
    assert rep.removed_sets == [FP2] and not (tmp_path / FP2).exists()
    assert (tmp_path / "notes" / "readme.txt").exists()  # not a feature set: left alone
    assert [i.fingerprint for i in store.ls()] == [FP]
    assert not store.contains(FP2, keys_for(range(4))).any()
    assert store.gc().removed_sets == []  # keep_fingerprints=None keeps everything


def test_gc_keep_keys_compacts_and_drops_emptied_sets(tmp_path):
    store = FeatureStore(tmp_path)
    for lo in range(0, 30, 10):
        store.put(FP, keys_for(range(lo, lo + 10)), emb_for(range(lo, lo + 10)))
    store.put(FP2, keys_for(range(100, 105)), emb_for(range(100, 105)))
    keep = keys_for(range(0, 30, 3))

    dry = store.gc(keep_keys=keep, dry_run=True)
    assert dry.removed_keys == 20 + 5 and dry.removed_sets == [FP2] and len(shard_paths(tmp_path)) == 3
    rep = store.gc(keep_keys=keep)
    assert rep.removed_keys == 25 and rep.removed_sets == [FP2] and list(rep.compacted) == [FP]
    assert len(shard_paths(tmp_path)) == 1 and not (tmp_path / FP2).exists()
    np.testing.assert_array_equal(store.get(FP, keep), emb_for(range(0, 30, 3)))
    assert store.contains(FP, keys_for(range(30))).sum() == 10


def test_gc_restores_missing_meta_json(tmp_path):
    store = FeatureStore(tmp_path)
    store.put(FP, keys_for(range(3)), emb_for(range(3)), meta={"backbone": "toy/net", "engine": "torch"})
    (tmp_path / FP / "meta.json").unlink()
    assert store.verify(FP).meta_problem and not store.verify(FP).ok
    assert store.ls()[0].backbone == "toy/net"  # falls back to the shards' own metadata
    store.gc()
    meta = json.loads((tmp_path / FP / "meta.json").read_text())
    assert meta["backbone"] == "toy/net" and meta["dim"] == D and store.verify(FP).ok


@pytest.mark.slow
def test_read_speed_50k_x_1280(tmp_path):
    n, dim = 50_000, 1280
    x = np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32)
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    writer = FeatureStore(tmp_path)
    for lo in range(0, n, 12_500):
        writer.put(FP, keys[lo:lo + 12_500], x[lo:lo + 12_500])
    FeatureStore(tmp_path).get(FP, keys[:10])  # warm the OS page cache once
    best = min(_timed(lambda: FeatureStore(tmp_path).get(FP, keys)) for _ in range(3))
    # a generous bound (a loaded 2-core CI machine must not trip it): a columnar read takes a
    # fraction of a second, a row-by-row one tens of seconds
    assert best < 5.0, f"cold read of 50k x 1280 took {best:.2f}s"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
