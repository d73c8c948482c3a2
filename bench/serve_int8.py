"""Serving an INT8 champion (issue #14 item 4): tlpipe on Ray Serve vs `mlflow models serve` of
the same model, one run, loopback.

The model: EfficientNet-Lite0 @224 INT8 (NNCF, calibrated on a seeded sample of <= 300
clothing-small train photos) + LinearProbe on train photos, calibrated on the validation split,
saved (the quantized IR travels in the predictor's ``int8/``) and registered in a temporary
MLflow registry as the champion. Both servers load that registered predictor, so both run the
INT8 graph: tlpipe through `deploy.app.run` (what `tlpipe serve` calls), MLflow through tlpipe's
own pyfunc (`jobs.pyfunc_model`, base64 JPEG in JSON). The load generator, the measurements and
the server start-up are bench/serve.py's.

Rows: closed loop at each ``--clients`` for both servers; tlpipe open loop (Poisson) at 80 % of
its peak. Targets: tlpipe peak >= 4x mlflow's; p99 <= 250 ms at 80 % of the peak.

    python -m bench.serve_int8 [--duration 15] [--clients 1,4,16] [--config colocated+direct:2x1] [--write]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.serve import (MODEL_NAME, SPEC, ServerConfig, clothing_root, free_port, measured_loop,
                         mlflow_bodies, multipart_bodies, open_loop, split_files, start_mlflow, start_tlpipe)


def build_int8_champion(root: Path, state: Path, per_class: int) -> tuple[Path, object, float]:
    """Quantize on the train photos (or find that model in the cache), fit + calibrate the head on
    INT8 features, save and register it as the champion; returns (predictor dir, INT8 spec, the
    seconds NNCF took when the model was made)."""
    import mlflow

    from jobs.registry import register_predictor
    from jobs.tracking import setup_mlflow
    from pipeline.backbones import get_spec, load_backbone
    from pipeline.backbones.quantize import calibration_id, calibration_sample, ensure_int8
    from pipeline.heads import LinearProbe
    from pipeline.images import sha256_bytes
    from pipeline.predictor import Predictor
    from pipeline.preprocess import load_pixels

    all_train = split_files(root, "train")
    sample = calibration_sample([(sha256_bytes(p.read_bytes()), str(p)) for p, _ in all_train])
    spec = get_spec(SPEC + "@int8").replace(calibration=calibration_id([k for k, _ in sample]))
    spec, path = ensure_int8(spec, "openvino", calibration_paths=[p for _, p in sample])
    q_seconds = json.loads(path.with_suffix(".json").read_text())["quantize_seconds"]  # when it was made
    backbone = load_backbone(spec, engine="openvino")

    def embed(items):
        return np.concatenate([backbone.embed(np.stack([load_pixels(p, spec) for p, _ in items[i:i + 64]]))
                               for i in range(0, len(items), 64)])

    train, val = split_files(root, "train", per_class), split_files(root, "validation")
    X_tr, X_val = embed(train), embed(val)
    y_tr, y_val = [c for _, c in train], [c for _, c in val]
    head = LinearProbe(n_threads=1).fit(X_tr, y_tr, X_val, y_val)
    predictor = Predictor(spec, head, info={"bench": "serve-int8"})
    predictor.calibrate(X_val, y_val, target_precision=0.9)
    pdir = predictor.save(state / "predictor")
    exp = setup_mlflow(state, "bench-serve-int8")
    mlflow.set_experiment(experiment_id=exp)
    register_predictor(pdir, MODEL_NAME, alias="champion")
    return pdir, spec, q_seconds


def _fmt(r: dict) -> dict:
    return {"clients": r["clients"], "req/s": f"{r['req_s']:.1f}", "p50 ms": f"{r['p50_ms']:.0f}",
            "p99 ms": f"{r['p99_ms']:.0f}", "server CPU ms/req": f"{r['server_cpu_ms']:.0f}",
            "requests": r["requests"], "errors": r["errors"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="clothing-small dir or archive (default: shared data)")
    parser.add_argument("--per-class", type=int, default=60, help="train photos per class for the head")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds measured per row")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--config", default="colocated+direct:2x1", help="tlpipe server configuration "
                        "(bench/serve.py --configs syntax)")
    parser.add_argument("--mlflow-workers", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    import mlflow
    import ray
    from ray import serve

    from bench.extract import isa
    from bench.report import markdown_table, write_section

    load_before = " ".join(open("/proc/loadavg").read().split()[:3])
    root = clothing_root(args.data)
    photos = [p for p, _ in split_files(root, "test")]
    state = Path(tempfile.mkdtemp(prefix="tlpipe-bench-serve-int8-"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the temporary registry under `state`
    _pdir, spec, q_seconds = build_int8_champion(root, state, args.per_class)
    tracking_uri = mlflow.get_tracking_uri()
    rows = []
    port = free_port()
    proc = start_mlflow(f"models:/{MODEL_NAME}@champion", tracking_uri, port, args.mlflow_workers)
    mlflow_peak = 0.0
    try:
        bodies = mlflow_bodies(photos)
        for c in clients:
            r = measured_loop(f"http://127.0.0.1:{port}/invocations", bodies, c, args)
            rows.append({"server": f"mlflow models serve (tlpipe pyfunc, INT8 OpenVINO, {args.mlflow_workers} worker)",
                         **_fmt(r)})
            print(rows[-1], flush=True)
            mlflow_peak = max(mlflow_peak, r["req_s"])
    finally:
        proc.terminate()
        proc.wait(30)
    config = ServerConfig.parse(args.config)
    url = start_tlpipe(state, free_port(), args, config)
    peak = 0.0
    try:
        bodies = multipart_bodies(photos)
        for c in clients:
            r = measured_loop(url + "/v1/predict", bodies, c, args)
            rows.append({"server": config.label + ", INT8", **_fmt(r)})
            print(rows[-1], flush=True)
            peak = max(peak, r["req_s"])
        ol = asyncio.run(open_loop(url + "/v1/predict", bodies, 0.8 * peak, args.duration, args.warmup))
        print(ol, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    ratio = peak / mlflow_peak if mlflow_peak else float("nan")
    text = "\n".join([
        markdown_table(rows, ["server", "clients", "req/s", "p50 ms", "p99 ms", "server CPU ms/req",
                              "requests", "errors"]), "",
        f"Open loop (Poisson) at 80 % of tlpipe's peak: {ol['rate']:.1f} req/s, p50 {ol['p50_ms']:.0f} ms, "
        f"**p99 {ol['p99_ms']:.0f} ms** ({ol['requests']} requests, {ol['errors']} errors; target <= 250 ms: "
        f"{'met' if ol['p99_ms'] <= 250 else 'NOT met'}).",
        f"Peak: tlpipe **{peak:.1f} req/s** vs mlflow models serve of the same INT8 model **{mlflow_peak:.1f} req/s** "
        f"= **{ratio:.2f}x** (target >= 4x: {'met' if ratio >= 4 else 'NOT met'}).", "",
        f"Model: {spec.name} (calibration sample {spec.calibration[:12]}: <= 300 train photos; NNCF took "
        f"{q_seconds:.1f} s when the model was made) + LinearProbe ({args.per_class} train photos a class). CPU: {isa()}; load average "
        f"{load_before} at the start (other jobs share the 2 cores). {args.duration:g} s measured per row after "
        f"{args.warmup:g} s warm-up; bench/serve.py's load generator, on the same machine.",
    ])
    print(text)
    if args.write:
        write_section("serve-int8", "Serving an INT8 champion — Ray Serve vs mlflow models serve",
                      "python -m bench.serve_int8 " + " ".join(sys.argv[1:]), text)


if __name__ == "__main__":
    main()
