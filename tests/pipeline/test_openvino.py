"""OpenVINO engine: the same cached export as ONNX Runtime, compiled for the CPU; numbers agree
with torch and ORT, it is checked once per OpenVINO version, and it is safe to call from threads."""
from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

from pipeline.backbones import load_backbone  # noqa: E402
from pipeline.backbones.openvino_runtime import OpenVinoBackbone, _check_sidecar, load_openvino_backbone  # noqa: E402
from pipeline.backbones.registry import default_cpu_engine  # noqa: E402

from .test_onnx import LITE0, _cos_rows, _photos, lite0_torch  # noqa: E402,F401 (a fixture)


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ov-cache")


def test_lite0_openvino_matches_torch_and_onnx(lite0_torch, ov_cache):
    spec = lite0_torch.spec
    ov = load_openvino_backbone(spec, cache_dir=ov_cache, torch_backbone=lite0_torch, intra_op_num_threads=2)
    assert isinstance(ov, OpenVinoBackbone) and ov.engine == "openvino" and ov.embed_dim == 1280
    assert ov.fingerprint == spec.fingerprint_for("openvino", "float32") != spec.fingerprint_for("onnx", "float32")
    onnx = load_backbone(LITE0, engine="onnx", cache_dir=ov_cache)  # the same exported file
    assert onnx.path == ov.path
    x = _photos(spec, 6)
    a, b, c = lite0_torch.embed(x), ov.embed(x), onnx.embed(x)
    assert b.shape == (6, 1280) and b.dtype == np.float32
    assert _cos_rows(a, b).min() >= 0.999 and _cos_rows(c, b).min() >= 0.9999
    for n in (1, 5):  # dynamic batch
        assert _cos_rows(lite0_torch.embed(x[:n]), ov.embed(x[:n])).min() >= 0.999
    # the check against ORT ran once and is remembered for this OpenVINO version
    side = _check_sidecar(ov.path)
    assert json.loads(side.read_text())["min_cosine"] >= 0.999 and ov.verified_min_cosine >= 0.999
    # the real classifier head still answers through torch: espresso
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    from pipeline.preprocess import prepare

    assert int(ov.classify(prepare(Image.fromarray(skimage_data.coffee()), spec)).argmax()) == 967


def test_auto_prefers_openvino_on_cpu(ov_cache):
    assert default_cpu_engine() == "openvino"
    bb = load_backbone(LITE0, engine="auto", cache_dir=ov_cache)
    assert isinstance(bb, OpenVinoBackbone)
    with pytest.raises(ValueError, match="float32"):
        load_backbone(LITE0, engine="openvino", dtype="bfloat16")


def test_concurrent_callers_get_their_own_results(ov_cache):
    """Requests are borrowed per call: results never mix, and outputs are copies, not views of a
    buffer the next inference overwrites."""
    bb = load_backbone(LITE0, engine="openvino", cache_dir=ov_cache, intra_op_num_threads=1)
    spec = bb.spec
    x = _photos(spec, 8)
    expected = [bb.embed(x[i:i + 2]) for i in range(0, 8, 2)]
    first = bb.embed(x[:2])
    bb.embed(x[6:])  # would overwrite `first` if it were a view
    np.testing.assert_array_equal(first, expected[0])
    results: dict[tuple[int, int], np.ndarray] = {}

    def worker(t: int) -> None:
        for r in range(5):
            i = (t + r) % 4
            results[(t, r)] = (i, bb.embed(x[2 * i:2 * i + 2]))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20
    for i, emb in results.values():
        np.testing.assert_allclose(emb, expected[i], rtol=1e-5, atol=1e-5)


def test_a_runtime_that_disagrees_fails_loudly(lite0_torch, tmp_path, monkeypatch):
    import pipeline.backbones.onnx_runtime as ort_mod

    spec = lite0_torch.spec
    load_backbone(LITE0, engine="onnx", cache_dir=tmp_path)  # export, no OpenVINO check yet
    real_session = ort_mod.session

    class Negated:
        def __init__(self, *a, **k):
            self.s = real_session(*a, **k)

        def run(self, names, feeds):
            return [-o for o in self.s.run(names, feeds)]

    monkeypatch.setattr(ort_mod, "session", Negated)
    with pytest.raises(RuntimeError, match="disagrees with ONNX Runtime"):
        load_openvino_backbone(spec, cache_dir=tmp_path)
    assert not _check_sidecar(ort_mod.onnx_path(spec, tmp_path)).exists()
    monkeypatch.setattr(ort_mod, "session", real_session)
    assert load_openvino_backbone(spec, cache_dir=tmp_path).verified_min_cosine >= 0.999


_SIGNALS_AFTER_MODELS_GO = r"""
import gc, os, signal, sys
from pathlib import Path
from pipeline.backbones.openvino_runtime import _compile

path = Path(sys.argv[1])
a = _compile(path, 1, False)
b = _compile(path, 1, False)
del a; gc.collect()  # dropped in the order they were made, as a hot reload does
del b; gc.collect()
got = []
signal.signal(signal.SIGTERM, lambda *_: got.append("SIGTERM"))
os.kill(os.getpid(), signal.SIGTERM)
try:
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(1000):
        pass
except KeyboardInterrupt:
    got.append("SIGINT")
print("handled", *got, flush=True)
"""


def _tiny_model(tmp_path):
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([-1, 4], np.float32)
    w = ops.constant(np.arange(16, dtype=np.float32).reshape(4, 4) / 10)
    path = tmp_path / "tiny.xml"
    ov.save_model(ov.Model([ops.relu(ops.matmul(x, w, False, False))], [x]), str(path))
    return path


def _run(compiled, x):
    return np.array(compiled.create_infer_request().infer({0: x})[0])


def test_compiled_model_is_cached_beside_the_export_and_bad_blobs_are_recompiled(tmp_path, caplog, monkeypatch):
    from pipeline.backbones import openvino_runtime as ovr

    path = _tiny_model(tmp_path)
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    first = ovr._compile(path, 1, False)
    blobs = list(tmp_path.glob("tiny.openvino-*.blob"))
    assert len(blobs) == 1 and blobs[0].stat().st_size > 0
    calls = []
    core = ovr._core()
    # the next load imports the blob: nothing is compiled
    monkeypatch.setattr(ovr, "_core", lambda: _Spy(core, calls))
    np.testing.assert_array_equal(_run(ovr._compile(path, 1, False), x), _run(first, x))
    assert calls == []
    # a different config is another blob
    ovr._compile(path, 2, False)
    assert calls == ["compile"] and len(list(tmp_path.glob("tiny.openvino-*.blob"))) == 2
    # a blob this OpenVINO cannot read is compiled again (with a warning) and replaced
    blobs[0].write_bytes(b"not a blob")
    with caplog.at_level("WARNING", logger=ovr.__name__):
        np.testing.assert_array_equal(_run(ovr._compile(path, 1, False), x), _run(first, x))
    assert calls == ["compile"] * 2 and "ignoring the compiled OpenVINO blob" in caplog.text
    assert blobs[0].stat().st_size > 100
    # a re-export (new mtime) never meets the old blob
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    ovr._compile(path, 1, False)
    assert calls == ["compile"] * 3

    # a read-only cache dir (a bundled predictor) only costs the compile
    def read_only(*_):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(ovr, "write_atomic", read_only)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    np.testing.assert_array_equal(_run(ovr._compile(path, 1, False), x), _run(first, x))
    assert calls == ["compile"] * 4


class _Spy:
    """The real Core, counting compiles."""

    def __init__(self, core, calls):
        self._core, self._calls = core, calls

    def compile_model(self, *a, **k):
        self._calls.append("compile")
        return self._core.compile_model(*a, **k)

    def __getattr__(self, name):
        return getattr(self._core, name)


def test_signals_still_reach_python_after_compiled_models_are_dropped(tmp_path):
    """Each OpenVINO Core's CPU plugin swaps in its own alternate signal stack and unmaps it when
    it goes; Cores dropped out of LIFO order left a dangling stack, so the next SIGTERM / Ctrl-C
    was a SIGSEGV (found by the tracked-run SIGTERM test in the full suite). Run in a child process
    so a regression kills the child, not pytest."""
    import subprocess
    import sys

    from tests.conftest import REPO

    model_xml = _tiny_model(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _SIGNALS_AFTER_MODELS_GO, str(model_xml)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        f"child exited {proc.returncode} (-11 is SIGSEGV):\n{proc.stdout}\n{proc.stderr[-2000:]}")
    assert proc.stdout.split() == ["handled", "SIGTERM", "SIGINT"]
