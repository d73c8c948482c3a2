"""Malformed data through the real `tlpipe run` command (issue #6, item 1) and the served
artifacts loading with pickle disabled (item 6).

One real run, shared by the module: a subprocess runs the typer app exactly as the `tlpipe` entry
point does (real embedded Ray, real EfficientNet-Lite0 weights from the pip package at 96 px, a real
sqlite MLflow store under tmp_path) over an ImageFolder of good images in three classes plus every
kind of malformed file in tests/malformed_corpus.py. It must finish, register a model, and list
every excluded file with its reason code, on the console and in the dataset card logged to MLflow.
Datasets nothing can be trained on must fail before any work with exactly one `error:` line.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from malformed_corpus import RUN_CLASSES, colour_tile, make_run_corpus, make_unworkable_datasets  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LITE0 = "efficientnet/tf_efficientnet_lite0.in1k"
SMALL = "efficientnet/tf_efficientnet_lite0.px96"  # real Lite0 weights at 96 px: a fast real backbone
MODEL = "mixed"  # registered under the dataset folder's name
# the console prints these outcomes nowhere; everything else is an ExcludedFile code
NOT_EXCLUDED = {"ok", "duplicate", "ignored", "empty_class"}

# Runs the typer app the way the `tlpipe` entry point does, after registering the 96 px variant of
# Lite0 (the CLI takes backbones by registered name only).
_WITH_SMALL_BACKBONE = (
    "from pipeline.backbones import get_spec, register\n"
    f"register(get_spec({LITE0!r}).replace(name={SMALL!r}, input_size=96, crop_pct=1.0))\n"
    "from cli.app import app\n"
    "app(prog_name='tlpipe')\n"
)


def tlpipe(args: list[str], *, cwd: Path, small_backbone: bool = False, timeout: float = 400
           ) -> subprocess.CompletedProcess:
    # RAY_ADDRESS=local: a Ray of its own, even when a `ray start` cluster runs on this machine
    env = {**os.environ, "PYTHONPATH": str(REPO), "TLPIPE_DEBUG": "", "COLUMNS": "160",
           "RAY_ADDRESS": "local"}
    cmd = ([sys.executable, "-c", _WITH_SMALL_BACKBONE] if small_backbone
           else [sys.executable, "-m", "cli.app"]) + [str(a) for a in args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          errors="backslashreplace")


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("malformed-run")
    data = base / MODEL
    expected = make_run_corpus(data)
    root = base / "state"
    proc = tlpipe(["run", data, "-b", SMALL, "--heads", "linear,knn,centroid", "--root", root],
                  cwd=base, small_backbone=True)
    return dict(base=base, data=data, root=root, expected=expected, proc=proc,
                out=proc.stdout, err=proc.stderr)


@pytest.fixture(scope="module")
def mlflow_client(mixed_run):
    import mlflow
    from mlflow import MlflowClient

    from jobs.tracking import tracking_uri_for, use_tracking_uri

    previous = mlflow.get_tracking_uri()
    uri = tracking_uri_for(mixed_run["root"])
    use_tracking_uri(uri)  # not mlflow.set_tracking_uri: it also exports MLFLOW_TRACKING_URI
    yield MlflowClient(tracking_uri=uri)
    use_tracking_uri(previous)


def _excluded_expected(expected: dict[str, str]) -> dict[str, str]:
    from pipeline.data import display_path

    return {display_path(p): code for p, code in expected.items() if code not in NOT_EXCLUDED}


def test_corpus_covers_every_kind_the_issue_lists(mixed_run):
    codes = set(mixed_run["expected"].values())
    # corrupt, truncated, zero-byte, text named .jpg, bomb / huge dimensions, same bytes in two
    # classes, empty class folder, symlink loop, unreadable link, files outside a class folder
    assert {"corrupt", "truncated", "empty", "not_image", "too_many_pixels", "label_conflict",
            "empty_class", "symlink_loop", "unreadable", "unlabelled", "duplicate"} <= codes
    names = " ".join(mixed_run["expected"])
    for odd in ("cmyk", "gray16", "palette_transparent", "exif_rotated", "animated.gif",
                "animated.webp", "grayscale", "long_", "[bold]"):
        assert odd in names, odd
    assert len(mixed_run["expected"]) >= 40


def test_mixed_dataset_completes_and_registers(mixed_run):
    proc = mixed_run["proc"]
    assert proc.returncode == 0, f"tlpipe run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"registered {MODEL} version 1 as @challenger" in proc.stdout
    # nothing that intake excluded reached extraction: 0 failed in the extraction table
    row = next(line for line in proc.stdout.splitlines() if SMALL in line and "│" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[1] in ("openvino", "onnx", "torch")
    requested, cached, extracted, failed = map(int, cells[2:6])
    assert (failed, cached) == (0, 0) and extracted == requested


def test_console_lists_every_excluded_file_with_its_code(mixed_run):
    out = mixed_run["out"]
    excluded = _excluded_expected(mixed_run["expected"])
    assert f"Excluded files (first {len(excluded)} of {len(excluded)})" in out
    for path, code in excluded.items():
        # path | code | reason on one table row (paths are short enough not to fold)
        assert re.search(re.escape(path) + r"\s*│\s*" + re.escape(code) + r"\s*│\s*\S", out), (path, code)
    for line in ("1 class folder(s) hold no image files: empty_class", "non-image file(s) ignored"):
        assert line in out


def test_card_logged_to_mlflow_lists_every_exclusion(mixed_run, mlflow_client):
    from pipeline.data import DatasetCard

    mv = mlflow_client.get_model_version(MODEL, "1")
    local = mlflow_client.download_artifacts(mv.run_id, "dataset/dataset_card.json",
                                             str(mixed_run["base"] / "card"))
    card = DatasetCard.from_dict(json.loads(Path(local).read_text()))
    assert {e.path: e.code for e in card.excluded} == _excluded_expected(mixed_run["expected"])
    assert all(len(e.reason) > 10 for e in card.excluded)
    assert card.classes == list(RUN_CLASSES)
    assert card.empty_classes == ["empty_class"] and card.ignored == ["cat/notes.txt"]
    assert card.label_conflicts == [["cat/conflict.png", "dog/conflict.png"]]
    assert card.duplicates == [["dog/dup_a.png", "dog/dup_b.png"]]
    n_ok = sum(v == "ok" for v in mixed_run["expected"].values())
    assert card.n_images == n_ok
    assert mv.tags["dataset_hash"] == card.dataset_hash
    assert str(mlflow_client.get_model_version_by_alias(MODEL, "challenger").version) == "1"


# ----------------------------------------------------------------------------- item 6: no pickle

@pytest.fixture
def pickle_disabled(monkeypatch):
    """Every route to unpickling raises; torch.load only works with weights_only=True."""
    import cloudpickle
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("the served artifact tried to unpickle something")

    for mod in (pickle, cloudpickle):
        monkeypatch.setattr(mod, "load", refuse)
        monkeypatch.setattr(mod, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    real_torch_load = torch.load

    def torch_load(*args, **kwargs):
        if kwargs.get("weights_only") is not True:
            raise AssertionError("torch.load without weights_only=True")
        return real_torch_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", torch_load)
    yield


def _probe_images(mixed_run) -> list[bytes]:
    data = mixed_run["data"]
    images = [colour_tile(cls, 900 + i, fmt=fmt) for i, cls in enumerate(RUN_CLASSES)
              for fmt in ("PNG", "JPEG")]
    return images + [(data / "cat" / "cmyk.jpg").read_bytes(), (data / "dog" / "exif_rotated.jpg").read_bytes()]


@pytest.fixture(scope="module")
def reference(mixed_run, mlflow_client):
    """The registered predictor downloaded and run with nothing disabled."""
    from jobs.registry import predictor_path
    from pipeline.predictor import Predictor

    assert mixed_run["proc"].returncode == 0, "the run failed; see test_mixed_dataset_completes_and_registers"
    images = _probe_images(mixed_run)
    pdir = predictor_path(MODEL, "1", dst=mixed_run["base"] / "download")
    return pdir, images, [p.to_dict() for p in Predictor.load(pdir).predict_images(images)]


def test_served_artifacts_load_with_pickle_disabled(reference, pickle_disabled):
    import mlflow
    import pandas as pd

    from pipeline.predictor import Predictor

    pdir, images, expected = reference
    # a sanity check that the model learned something (chance is 1 in 3): the classifier's first
    # choice is mostly the right class (the decision itself may abstain: on ~40 labelled images the
    # out-of-fold precision rarely reaches the target)
    truth = [c for c in RUN_CLASSES for _ in range(2)]
    assert sum(e["top_k"][0]["label"] == t for e, t in zip(expected[:6], truth)) >= 4
    got = [p.to_dict() for p in Predictor.load(pdir).predict_images(images)]
    assert got == expected
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@challenger")
    served = model.predict(pd.DataFrame({"image": images}))
    # an abstention's label is None; in the DataFrame it may come back as NaN
    assert [None if pd.isna(x) else x for x in served["label"]] == [e["label"] for e in expected]
    assert list(served["decision"]) == [e["decision"] for e in expected]
    np.testing.assert_allclose(served["score"].to_numpy(), [e["score"] for e in expected], rtol=1e-5)


def test_pickle_guard_is_effective(pickle_disabled):
    import torch

    with pytest.raises(AssertionError, match="unpickle"):
        pickle.loads(pickle.dumps({"a": 1}))
    with pytest.raises(AssertionError, match="weights_only"):
        torch.load(Path(__file__))


# ----------------------------------------------------------------------------- fails early, cleanly

UNWORKABLE_FIX = {  # a word of the fix each message must name
    "single_class": "at least two",
    "all_bad": "To fix",
    "empty_folder": "expected <class>/<image> folders",
    "manifest_escapes_root": "inside the manifest's folder",
    "symlink_loop_dir": "real class folders",
    "self_link": "pass the real folder",
}


@pytest.fixture(scope="module")
def unworkable(tmp_path_factory):
    return make_unworkable_datasets(tmp_path_factory.mktemp("unworkable"))


def _check_one_error_line(text: str, case: str, words: tuple[str, ...]) -> None:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in lines[0]
    for word in words + (UNWORKABLE_FIX[case],):
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("case", sorted(UNWORKABLE_FIX))
def test_unworkable_dataset_fails_early_with_one_clear_line(unworkable, case, tmp_path):
    from typer.testing import CliRunner

    from cli.app import app

    path, words = unworkable[case]
    res = CliRunner().invoke(app, ["run", str(path), "-b", LITE0, "--root", str(tmp_path / "state")])
    assert isinstance(res.exception, SystemExit) and res.exit_code == 2, res.output
    assert res.stdout.strip() == ""  # the error goes to stderr, alone
    _check_one_error_line(res.stderr, case, words)
    assert not (tmp_path / "state").exists(), "failed before doing any work"


def test_real_process_prints_one_line_and_no_traceback(unworkable, tmp_path):
    path, words = unworkable["all_bad"]
    proc = tlpipe(["run", path, "-b", LITE0, "--root", tmp_path / "state"], cwd=tmp_path, timeout=180)
    assert proc.returncode == 2 and proc.stdout.strip() == "", proc.stdout
    _check_one_error_line(proc.stderr, "all_bad", words)


# ----------------------------------------------------------------------------- odd names on Ray Data

@pytest.fixture(scope="module")
def own_local_ray():
    """The session's Ray if one is up, else a local Ray of this process's own (never a `ray start`
    cluster that happens to run nearby), shut down after the module."""
    import ray

    from jobs.ray_runtime import ensure_ray

    started = not ray.is_initialized()
    if started:
        ensure_ray("local", num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


def test_odd_file_names_survive_the_ray_data_path(own_local_ray, tmp_path):
    """Large deltas go through Ray Data (Arrow blocks): a non-UTF-8 file name must not break it.
    `inline_max=0` forces that path on a handful of files."""
    from feature_store import FeatureStore
    from jobs.extract import extract_features
    from malformed_corpus import LONG_NAME, NON_UTF8_NAME
    from pipeline.backbones import get_spec
    from pipeline.images import sha256_bytes

    spec = get_spec(LITE0).replace(name="efficientnet/tf_efficientnet_lite0.px32", input_size=32, crop_pct=1.0)
    files = []
    for i, name in enumerate([b"plain.png", NON_UTF8_NAME, LONG_NAME.encode(), b"[bold]x[.png"]):
        data = colour_tile(RUN_CLASSES[i % 3], 700 + i, fmt="JPEG" if name.endswith(b".jpg") else "PNG")
        raw = os.fsencode(tmp_path) + b"/" + name
        try:
            with open(raw, "wb") as fh:
                fh.write(data)
        except OSError:
            continue  # a filesystem that refuses the name
        files.append((sha256_bytes(data), os.fsdecode(raw)))
    (stats,) = extract_features(files, [spec], store=FeatureStore(tmp_path / "features"),
                                engine="torch", inline_max=0, num_workers=1, cpus_per_worker=1)
    assert stats.executor == "ray-actors" and stats.failed == [], stats.failed
    assert stats.extracted == len(files)


def test_label_separator_reaches_intake_and_bad_sets_fail_with_one_line(cifar10_dir, tmp_path):
    """`tlpipe run` trains multi-label data (tests/jobs/test_multilabel_run.py); its
    `--label-separator` reaches intake through the CLI: label sets joined by another character
    leave '|' inside the labels, every row is refused with the reason, and the run stops with one
    `error:` line, exit 2, before Ray or MLflow start."""
    from tests.multilabel_mosaics import build_mosaics

    manifest = build_mosaics(cifar10_dir, tmp_path / "m", 30, seed=1)  # labels joined by '|'
    proc = tlpipe(["run", manifest, "--multi-label", "--label-separator", ";", "--root",
                   tmp_path / "state"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "which joins a label set" in errors[0], proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not list((tmp_path / "state").rglob("*.db"))  # no tracking store was set up


def test_an_unknown_backbone_or_head_fails_before_ray_starts(cifar10_dir, tmp_path, monkeypatch):
    """A misspelt backbone or head is refused with the list of known names before Ray starts or
    the dataset's files are read, and nothing is written under the state root."""
    import jobs.ray_runtime
    from jobs.run import run

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a run whose backbone does not exist")

    monkeypatch.setattr(jobs.ray_runtime, "ensure_ray", no_ray)
    with pytest.raises(KeyError, match=rf"unknown backbone 'lite0'.*Known backbones: .*{re.escape(LITE0)}"):
        run(str(cifar10_dir), root=tmp_path / "state", backbones=[LITE0, "lite0"])
    with pytest.raises(ValueError, match=r"unknown head 'mpl'; choose from .*'mlp'"):
        run(str(cifar10_dir), root=tmp_path / "state", backbones=[LITE0], heads=["linear", "mpl"])
    assert not [p for p in (tmp_path / "state").rglob("*") if p.is_file()]
