"""Access control and safety (issue #6, item 6) — what tests/deploy/test_app.py does not cover.

test_app.py (real Ray Serve) already checks: no token -> 401, Basic scheme -> 401, wrong token ->
403 on every admin route; 413 for too-large bodies, too many images and too many pixels. Here,
without Ray (FastAPI's TestClient around a real ServingService that has no model loaded yet):

* empty bearer, other schemes, near-miss tokens, lower-case scheme, admin disabled;
* the token comparison is the constant-time `hmac.compare_digest` and the token never leaks;
* a chunked body with no Content-Length is still capped at max_request_bytes;
* the pixel limit set through the settings (environment) reaches the decoder;
* manifest paths, archive members and dataset names cannot escape their root.

The no-pickle loading of the served artifacts (predictor + MLflow pyfunc) is checked on a real
`tlpipe run` output in tests/jobs/test_malformed_run.py::test_served_artifacts_load_with_pickle_disabled.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from malformed_corpus import colour_tile, forged_bomb_png, write_manifest  # noqa: E402

TOKEN = "s3cret-admin-token-0123456789"
ADMIN_ROUTES = [("post", "/v1/classes/frog/examples"), ("delete", "/v1/classes/frog/examples/1"),
                ("delete", "/v1/classes/frog"), ("post", "/v1/reload")]


# ----------------------------------------------------------------------------- serving, no Ray

def _client(tmp_path: Path, **overrides):
    from fastapi.testclient import TestClient

    from deploy.api import create_api
    from deploy.service import ServingService
    from deploy.settings import load_settings

    settings = load_settings({"model": "nothing-yet@champion", "state_root": str(tmp_path),
                              "poll_interval_s": 0.0, **overrides}, environ={})
    service = ServingService(settings, embedder=None)  # never reached: no model is loaded
    return TestClient(create_api(service), raise_server_exceptions=False), service


@pytest.fixture
def api(tmp_path):
    client, _ = _client(tmp_path, admin_token=TOKEN, max_request_bytes=4096)
    with client:
        yield client


@pytest.mark.parametrize("authorization,status,code", [
    ("Bearer ", 401, "unauthorized"),                      # empty token
    ("Bearer", 401, "unauthorized"),                       # scheme only
    (f"Basic {TOKEN}", 401, "unauthorized"),               # right secret, wrong scheme
    (f"Token {TOKEN}", 401, "unauthorized"),
    (f"{TOKEN}", 401, "unauthorized"),                     # no scheme at all
    (f"Bearer {TOKEN[:-1]}", 403, "forbidden"),            # prefix of the token
    (f"Bearer {TOKEN}x", 403, "forbidden"),                # token plus a suffix
    (f"Bearer {TOKEN.upper()}", 403, "forbidden"),         # case matters in the secret
    (f"Bearer {TOKEN} {TOKEN}", 403, "forbidden"),
])
@pytest.mark.parametrize("method,path", ADMIN_ROUTES)
def test_admin_routes_refuse_bad_credentials(api, method, path, authorization, status, code):
    r = getattr(api, method)(path, headers={"Authorization": authorization})
    assert (r.status_code, r.json()["error"]) == (status, code), r.text
    assert TOKEN not in r.text


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_right_token_passes_auth(api, scheme):
    # auth passes (the scheme is case-insensitive, RFC 7235); then the reload fails for lack of
    # a registered model: 503, not 401/403
    r = api.post("/v1/reload", headers={"Authorization": f"{scheme} {TOKEN}"})
    assert (r.status_code, r.json()["error"]) == (503, "reload_failed"), r.text


def test_admin_disabled_without_a_configured_token(tmp_path):
    client, service = _client(tmp_path)  # no admin_token
    assert service.settings.admin_token is None
    with client:
        for method, path in ADMIN_ROUTES:
            for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer anything"}):
                r = getattr(client, method)(path, headers=headers)
                assert r.status_code in (401, 403), (path, headers, r.text)
                assert r.status_code == 401 or r.json()["error"] == "admin_disabled"
        # a blank token in the environment disables admin too (it never means "any token")
        from deploy.settings import load_settings

        assert load_settings(environ={"TLPIPE_SERVE_ADMIN_TOKEN": "   "}).admin_token is None


def test_token_is_compared_in_constant_time(api, monkeypatch):
    import hmac

    import deploy.api

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(deploy.api.hmac, "compare_digest", spy)
    api.post("/v1/reload", headers={"Authorization": "Bearer guess"})
    api.post("/v1/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert calls == [(b"guess", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]


def test_token_never_leaks(api, tmp_path):
    from deploy.settings import load_settings

    for path in ("/v1/model", "/openapi.json", "/metrics", "/readyz", "/healthz"):
        assert TOKEN not in api.get(path).text
    s = load_settings({"admin_token": TOKEN}, environ={})
    assert TOKEN not in repr(s) and TOKEN not in str(s.public()) and s.public()["admin_enabled"] is True


def test_chunked_body_without_length_is_capped(api):
    sent = []

    def body():  # no Content-Length: the server must count as it reads
        for _ in range(64):
            sent.append(1024)
            yield b"\x00" * 1024

    r = api.post("/v1/predict", content=body(), headers={"Content-Type": "application/octet-stream"})
    assert (r.status_code, r.json()["error"]) == (413, "request_too_large"), r.text
    r = api.post("/v1/predict", content=b"\x00" * 5000, headers={"Content-Type": "image/png"})
    assert (r.status_code, r.json()["error"]) == (413, "request_too_large")


def test_pixel_limit_from_the_environment_reaches_the_decoder(tmp_path):
    from deploy.service import ServingService
    from deploy.settings import load_settings
    from pipeline.backbones import get_spec
    from pipeline.images import ImageValidationError

    spec = get_spec("efficientnet/tf_efficientnet_lite0.in1k").replace(input_size=32, crop_pct=1.0)
    tile = colour_tile("cat", 1, size=40)  # 1,600 pixels
    settings = load_settings({"model": "m@champion", "state_root": str(tmp_path)},
                             environ={"TLPIPE_SERVE_MAX_PIXELS": "1000"})
    assert settings.max_pixels == 1000
    limited = ServingService(settings, embedder=None)
    with pytest.raises(ImageValidationError) as info:
        limited._prepare(tile, spec)
    assert info.value.code == "too_many_pixels" and "1,000" in str(info.value)
    # the default limit takes the tile, and still refuses a forged 10-gigapixel header
    default = ServingService(load_settings({"model": "m@champion", "state_root": str(tmp_path)},
                                           environ={}), embedder=None)
    assert default._prepare(tile, spec).shape == (3, 32, 32)
    with pytest.raises(ImageValidationError) as info:
        default._prepare(forged_bomb_png(), spec)
    assert info.value.code == "too_many_pixels"


# ----------------------------------------------------------------------------- roots

def _two_class_tree(root: Path) -> None:
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            (root / cls / f"{i}.png").write_bytes(colour_tile(cls, 10 * i + len(cls)))


def test_manifest_paths_cannot_escape_the_manifest_folder(tmp_path):
    from pipeline.data import load_dataset

    data = tmp_path / "data"
    _two_class_tree(data)
    secret = tmp_path / "secret.png"
    secret.write_bytes(colour_tile("frog", 7))
    (data / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    rows = [(f"{c}/{i}.png", c) for c in ("cat", "dog") for i in range(3)] + [
        ("../secret.png", "cat"),                       # climbs out
        ("cat/../../secret.png", "cat"),                 # climbs out after going in
        ("./cat/../dog/../../secret.png", "dog"),
        (str(secret), "cat"),                            # absolute
        ("~/secret.png", "cat"),                         # home-relative
        ("linked_dir/secret.png", "dog"),                # through a symlinked folder
        ("cat/../cat/0.png", "cat"),                     # stays inside: allowed (a duplicate)
    ]
    ds = load_dataset(write_manifest(data / "m.csv", rows))
    escaped = {e.path: e.code for e in ds.card.excluded}
    for p, _ in rows[6:12]:
        assert escaped.get(p) == "outside_root", (p, escaped)
    real = os.path.realpath(data)
    assert all(os.path.realpath(r.path).startswith(real + os.sep) for r in ds.records)
    assert {os.path.realpath(r.path) for r in ds.records}.isdisjoint({os.path.realpath(secret)})
    assert [sorted(g) for g in ds.card.duplicates] == [["cat/../cat/0.png", "cat/0.png"]]


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize("evil,refused", [
    (lambda: _file("../escaped.png", b"x"), True),
    (lambda: _link("ds/cat/out", "../../../../escaped_dir"), True),
    (lambda: _link("ds/cat/abs", "/etc/passwd"), True),
    (lambda: _link("ds/cat/hard", "/etc/passwd", tarfile.LNKTYPE), True),
    # an absolute member name is made relative: it lands inside the unpack folder
    (lambda: _file("/tmp/tlpipe-absolute-escape.png", b"x"), False),
], ids=["dotdot", "symlink-out", "symlink-abs", "hardlink-abs", "absolute-name"])
def test_archive_members_cannot_escape(tmp_path, evil, refused):
    from pipeline.archives import ArchiveError, unpack

    archive = _tar(tmp_path / "evil.tar.gz", [_file("ds/cat/0.png", colour_tile("cat", 0)), evil()])
    cache = tmp_path / "cache"
    if refused:
        with pytest.raises(ArchiveError, match="refusing to unpack"):
            unpack(archive, cache)
        assert not [p for p in cache.rglob("*") if not p.name.endswith(".lock")]  # nothing half-unpacked
    else:
        root = unpack(archive, cache)
        assert (root / "tmp" / "tlpipe-absolute-escape.png").is_file()
    outside = [p for p in tmp_path.rglob("*") if p != archive and not p.is_relative_to(cache)]
    assert outside == [] and not Path("/tmp/tlpipe-absolute-escape.png").exists()


def test_zip_slip_and_broken_archives_are_clear_errors(tmp_path):
    from pipeline.archives import ArchiveError, unpack

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("ds/cat/0.png", colour_tile("cat", 0))
        zf.writestr("../../zip-escaped.png", b"x")
    with pytest.raises(ArchiveError, match="escapes the archive"):
        unpack(evil, tmp_path / "cache")
    assert not (tmp_path.parent / "zip-escaped.png").exists()
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00 this is not really gzip")
    with pytest.raises(ArchiveError, match="not a readable archive"):
        unpack(broken, tmp_path / "cache")
    empty = tmp_path / "empty.zip"
    empty.write_bytes(b"")
    with pytest.raises(ArchiveError, match="empty"):
        unpack(empty, tmp_path / "cache")


def test_a_safe_archive_unpacks_under_the_cache(tmp_path):
    from pipeline.archives import unpack
    from pipeline.data import load_dataset

    members = [_file(f"ds/{c}/{i}.png", colour_tile(c, i)) for c in ("cat", "dog") for i in range(3)]
    members.append(_link("ds/cat/same.png", "0.png"))  # a link inside the archive is fine
    root = unpack(_tar(tmp_path / "ok.tar.gz", members), tmp_path / "cache")
    assert root.name == "ds" and root.resolve().is_relative_to((tmp_path / "cache").resolve())
    assert load_dataset(root).card.n_images == 6


@pytest.mark.parametrize("name", ["..", ".", "../../etc/cron.d/x", "a/b\\c", ".hidden", "-..-",
                                  "x" * 300, "caf\udce9", "", "  "])
def test_dataset_names_become_one_safe_path_component(name):
    from jobs.run import model_name_for

    got = model_name_for(SimpleNamespace(card=SimpleNamespace(name=name)))
    assert got and got not in (".", "..") and not got.startswith(".") and len(got) <= 100
    assert "/" not in got and "\\" not in got and os.sep not in got
    assert Path("/srv/root", got).resolve().parent == Path("/srv/root").resolve()


def test_served_model_folder_stays_under_the_serve_root(tmp_path):
    from deploy.model_source import parse_model_ref
    from deploy.settings import load_settings

    settings = load_settings({"state_root": str(tmp_path)}, environ={})
    serve_root = (tmp_path / "serve").resolve()
    pdir = tmp_path / "x" / ".."  # a path reference whose folder name is '..'
    (tmp_path / "x").mkdir()
    (tmp_path / "predictor.json").write_text("{}")
    for ref in ("ok-name@champion", "a..b/3", str(pdir)):
        key = parse_model_ref(ref).key
        assert settings.serve_dir(key).parent == serve_root, (ref, key)
    for bad in ("../../etc@champion", "a/b/c@champion", "..@champion", "x@../y"):
        with pytest.raises(ValueError):
            parse_model_ref(bad)


def test_no_pickle_in_the_persistence_code():
    """Static guard next to the runtime one in test_malformed_run: the load paths of the served
    artifact never call pickle, and every torch.load / np.load is explicit about it."""
    import re

    repo = Path(__file__).resolve().parents[1]
    offenders = []
    for pkg in ("pipeline", "feature_store", "deploy", "jobs"):
        for f in (repo / pkg).rglob("*.py"):
            for n, line in enumerate(f.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if re.search(r"\b(pickle|cloudpickle|joblib)\.(load|loads|Unpickler)\b", code):
                    offenders.append(f"{f.relative_to(repo)}:{n}: {line.strip()}")
                if "torch.load(" in code and "weights_only=True" not in code:
                    offenders.append(f"{f.relative_to(repo)}:{n}: {line.strip()}")
                if re.search(r"\bnp\.load\(", code) and "allow_pickle=False" not in code:
                    offenders.append(f"{f.relative_to(repo)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
