"""Fuzzing the serving API (issue #6 item 5): schemathesis against the running app's OpenAPI spec.

The application (Ray Serve on a local Ray, the real EfficientNet-Lite0 predictor of the conftest,
served from an MLflow registry) is started once for the module; schemathesis loads its
``/openapi.json`` over real HTTP and generates requests for every operation — the health routes,
/metrics, the model routes, predict (multipart, base64 JSON and raw image bodies) and the admin
routes — in its examples, coverage and fuzzing phases, positive and negative. The admin routes run
three times: with the server's token, with a wrong one and with none. A second test mutates real
photos (truncation, flipped bytes, spliced junk) and sends them through each body encoding; a third
replays crafted inputs that reached the 500 handler before they were fixed (PIL plugins raising
NotImplementedError / TypeError, JSON nested past the parser's recursion limit).

The property: no request gets a server error (5xx), and every failure is the API's JSON error
(``{"error", "message", ...}``). Budget: 12 examples per operation and mode (TLPIPE_FUZZ_EXAMPLES
to change), about 20 s of requests on 2 CPU cores once the app is up.
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_helpers import free_port, register_in_tmp_store  # noqa: E402

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402

NAME = "fuzzed"
TOKEN = "fuzz-token-5b1e"
APP = "tlpipe-fuzz"
# small limits, so the generated bodies also reach the 413 paths
LIMITS = dict(max_images_per_request=3, max_request_bytes=200_000, max_pixels=1_000_000,
              max_examples_per_request=3)
DEFAULT_EXAMPLES = 12  # per operation and generation mode; TLPIPE_FUZZ_EXAMPLES=60 for a deeper run
AUTHS = {"token": {"Authorization": f"Bearer {TOKEN}"}, "wrong-token": {"Authorization": "Bearer nope"},
         "no-token": {}}


@pytest.fixture(scope="module")
def fuzz_url(ray_serve, serving_model, tmp_path_factory):
    """The app on a free loopback port, serving NAME@champion from a registry in tmp."""
    import httpx
    from ray import serve

    from deploy.app import build_app

    root = tmp_path_factory.mktemp("fuzz-state")
    tracking_uri, _, _ = register_in_tmp_store(root, "serve-fuzz", serving_model.predictor_dir, NAME)
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    app = build_app(f"{NAME}@champion", tracking_uri=tracking_uri, state_root=str(root), engine="torch",
                    poll_interval_s=0, admin_token=TOKEN, decode_threads=2, max_batch_size=8,
                    batch_wait_timeout_s=0.005, colocate_backbone=True, ingress_options=small, **LIMITS)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name=APP, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    try:
        assert httpx.get(url + "/readyz", timeout=60).json()["status"] == "ready"
        yield url
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def api_schema(fuzz_url):
    schema = schemathesis.openapi.from_url(fuzz_url + "/openapi.json", timeout=30)
    return schema


def _is_admin(case) -> bool:
    return "admin" in (case.operation.tags or [])


def _not_an_error_body(response) -> str | None:
    """Why a 4xx answer is not the API's JSON error body (None when it is)."""
    if not 400 <= response.status_code < 500:
        return None
    try:
        body = response.json()
    except ValueError:
        return f"non-JSON body {response.text[:120]!r}"
    if not isinstance(body, dict) or not body.get("error") or not body.get("message"):
        return f"not an ErrorResponse: {str(body)[:160]}"
    return None


def _media_type(case) -> str | None:
    return (case.media_type or "").split(";")[0] or None


def _max_examples() -> int:
    return int(os.environ.get("TLPIPE_FUZZ_EXAMPLES") or DEFAULT_EXAMPLES)


def test_no_server_errors(fuzz_url):
    """Every operation of /openapi.json through schemathesis' examples, coverage and fuzzing phases
    (positive and negative cases); admin cases with the token, a wrong one and none."""
    from schemathesis.pytest.lazy import get_all_tests

    schema = schemathesis.openapi.from_url(fuzz_url + "/openapi.json", timeout=30)
    sent: dict[str, dict] = {}

    def check(case):
        for auth in AUTHS if _is_admin(case) else ["token"]:
            headers = AUTHS[auth]
            response = case.call(base_url=fuzz_url, headers=headers, timeout=60)
            curl = case.as_curl_command(headers=headers)
            seen = sent.setdefault(case.operation.label, {"statuses": set(), "media": set(), "auth": set(), "n": 0})
            seen["n"] += 1
            seen["statuses"].add(response.status_code)
            seen["media"].add(_media_type(case))
            seen["auth"].add(auth)
            try:
                case.validate_response(response, checks=[not_a_server_error], headers=headers)
            except FailureGroup as exc:
                raise AssertionError(f"server error {response.status_code} for {curl}:\n{response.text[:500]}") from exc
            assert response.status_code < 500, (response.status_code, curl, response.text[:500])
            why = _not_an_error_body(response)
            assert why is None, f"{response.status_code} {why} for {curl}"
            if auth != "token" and response.status_code not in (404, 405):
                # nothing gets past the token check (404/405: routing answers before authentication)
                assert response.status_code in (401, 403), (response.status_code, curl)

    failures = {}
    tests = list(get_all_tests(schema=schema, test_func=check, given_kwargs=None, settings=settings(
        max_examples=_max_examples(), deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck))))
    for result in tests:
        operation, test = result.ok()  # an invalid schema raises here
        try:
            test()
        except Exception as exc:  # noqa: BLE001 - collect per operation, report all at the end
            failures[operation.label] = exc
    for label, seen in sorted(sent.items()):
        print(f"{label}: {seen['n']} requests, statuses {sorted(seen['statuses'])}, "
              f"bodies {sorted(map(str, seen['media']))}, auth {sorted(seen['auth'])}")
    assert not failures, "\n\n".join(f"{label}: {exc}" for label, exc in failures.items())

    # the run covered every route of the spec, the admin ones in all three auth states, and each
    # body encoding of predict / add-examples
    labels = {f"{m.upper()} {p}" for p, ops in schema.raw_schema["paths"].items() for m in ops}
    assert labels and labels <= set(sent), labels - set(sent)
    for label, seen in sent.items():
        if "/classes/{name}" in label or label.endswith("/reload"):
            assert seen["auth"] == set(AUTHS), (label, seen)
    for label in ("POST /v1/predict", "POST /v1/classes/{name}/examples"):
        assert {"multipart/form-data", "application/json"} <= sent[label]["media"], (label, sent[label])
    assert "image/*" in sent["POST /v1/predict"]["media"] or any(
        (m or "").startswith("image/") for m in sent["POST /v1/predict"]["media"]), sent["POST /v1/predict"]


# ---------------------------------------------------------------------------- mutated real photos
def _mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for op, pos, value in ops:
        if not out:
            break
        i = pos % len(out)
        if op == "truncate":
            del out[i:]
        elif op == "flip":
            out[i] ^= (value % 255) + 1
        elif op == "insert":
            out[i:i] = bytes([value % 256]) * (1 + value % 17)
        elif op == "delete":
            del out[i:i + 1 + value % 64]
    return bytes(out)


_MUTATIONS = st.lists(st.tuples(st.sampled_from(["truncate", "flip", "insert", "delete"]),
                                st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=4)


def test_mutated_photos_never_5xx(fuzz_url, serving_model):
    """Real JPEGs and a PNG, damaged at random, through multipart, base64 JSON and raw bodies."""
    import io

    import httpx
    from PIL import Image

    from deploy.multipart import encode_multipart

    jpegs = [p.data for p in serving_model.classifier[:2]]
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpegs[0])).save(buf, "PNG")
    sources = jpegs + [buf.getvalue()]
    seen: dict[int, int] = {}

    with httpx.Client(base_url=fuzz_url, timeout=60) as client:
        @settings(max_examples=3 * _max_examples(), deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(src=st.integers(0, len(sources) - 1), ops=_MUTATIONS,
               how=st.sampled_from(["multipart", "base64", "raw", "admin-multipart"]))
        def one(src, ops, how):
            data = _mutate(sources[src], ops)
            if how in ("multipart", "admin-multipart"):
                body, ctype = encode_multipart([("file", "x.jpg", data, "image/jpeg")])
                path = "/v1/predict" if how == "multipart" else "/v1/classes/mutant/examples"
                headers = {"Content-Type": ctype, **(AUTHS["token"] if how == "admin-multipart" else {})}
                r = client.post(path, content=body, headers=headers)
            elif how == "base64":
                r = client.post("/v1/predict", json={"images": [base64.b64encode(data).decode()]})
            else:
                r = client.post("/v1/predict", content=data, headers={"Content-Type": "image/jpeg"})
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, (how, ops, r.status_code, r.text[:500])
            if r.status_code != 200:
                body = r.json()
                assert body["error"] and body["message"], body
            else:
                assert r.json()["predictions"] if how != "admin-multipart" else r.json()["added"]

        one()
    # both outcomes happened: some damage is tolerated (decoded), most is a clean 4xx
    assert seen.get(200) and sum(n for s, n in seen.items() if 400 <= s < 500), seen


# ---------------------------------------------------------------------------- crafted inputs
def _dds_unknown_pixel_format() -> bytes:
    """A DDS file whose pixel format flags PIL does not know: Image.open raises NotImplementedError."""
    import io
    import struct

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "DDS")
    data = bytearray(buf.getvalue())
    data[80:84] = struct.pack("<I", 0xFF000000)  # DDS_PIXELFORMAT.dwFlags
    return bytes(data)


def _tiff_second_page_without_size() -> bytes:
    """A 2-page TIFF whose 2nd IFD lacks width/height: counting frames raises TypeError in PIL."""
    import io
    import struct

    from PIL import Image

    buf = io.BytesIO()
    pages = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    data = bytearray(buf.getvalue())
    first = struct.unpack("<I", data[4:8])[0]
    n = struct.unpack("<H", data[first:first + 2])[0]
    second = struct.unpack("<I", data[first + 2 + 12 * n:first + 6 + 12 * n])[0]
    for j in range(struct.unpack("<H", data[second:second + 2])[0]):
        at = second + 2 + 12 * j
        if struct.unpack("<H", data[at:at + 2])[0] in (256, 257):  # ImageWidth, ImageLength
            data[at:at + 2] = struct.pack("<H", 0x7F00 + j)
    return bytes(data)


def test_crafted_inputs_get_json_4xx(fuzz_url):
    """Inputs that once reached the 500 handler (decoder exceptions outside PIL's usual set, JSON
    nested past the parser's recursion limit), and a few more edge cases: each a JSON 4xx."""
    import httpx

    from deploy.multipart import encode_multipart

    def multipart(data: bytes, name="x.img", extra=()):
        body, ctype = encode_multipart([("file", name, data, "application/octet-stream")])
        if extra:  # a plain form field before the closing boundary
            field = "".join(f'--tlpipe-boundary-7d41\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                            for k, v in extra).encode()
            body = field + body
        return {"content": body, "headers": {"Content-Type": ctype}}

    dds, tiff = _dds_unknown_pixel_format(), _tiff_second_page_without_size()
    cases = [
        ("dds-not-implemented", "/v1/predict", multipart(dds, "x.dds"), 400),
        ("dds-raw", "/v1/predict", {"content": dds, "headers": {"Content-Type": "image/x-dds"}}, 400),
        ("dds-base64", "/v1/predict", {"json": {"images": [base64.b64encode(dds).decode()]}}, 400),
        ("dds-admin", "/v1/classes/crafted/examples", {**multipart(dds, "x.dds"),
                                                       "headers": {**multipart(dds)["headers"], **AUTHS["token"]}}, 400),
        ("tiff-missing-dimensions", "/v1/predict", multipart(tiff, "x.tif"), 400),
        ("deep-json", "/v1/predict", {"content": b"[" * 100_000, "headers": {"Content-Type": "application/json"}}, 400),
        ("deep-json-images", "/v1/predict",
         {"content": b'{"images": ' + b"[" * 50_000, "headers": {"Content-Type": "application/json"}}, 400),
        ("huge-top-k-field", "/v1/predict", multipart(b"\x89PNG", extra=[("top_k", "9" * 5000)]), 422),
        ("data-url-not-base64", "/v1/predict", {"json": {"images": ["data:image/png,abc"]}}, 400),
        ("non-ascii-base64", "/v1/predict", {"json": {"images": ["ü" * 8]}}, 400),
        ("json-null", "/v1/predict", {"content": b"null", "headers": {"Content-Type": "application/json"}}, 422),
        ("json-not-utf8", "/v1/predict", {"content": b'{"images": ["\xff"]}',
                                          "headers": {"Content-Type": "application/json"}}, 400),
    ]
    failures = []
    with httpx.Client(base_url=fuzz_url, timeout=60) as client:
        for name, path, kwargs, status in cases:
            r = client.post(path, **kwargs)
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            if r.status_code != status or not body.get("error") or not body.get("message"):
                failures.append((name, r.status_code, r.text[:300]))
        assert client.get("/readyz").status_code == 200  # and the replica is fine afterwards
    assert not failures, failures
