"""Serving on a GPU: the deployment options `build_app` gives Ray for device cuda vs cpu (checked on
the deployments Ray Serve itself builds from the application), the settings' rules, the one-line
error of `tlpipe serve --device cuda` without a GPU, and (GPU machines only) a Backbone deployment
on CUDA in bf16/fp16 whose embeddings match the CPU fp32 engine."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_helpers import free_port  # noqa: E402

from pipeline.devices import cuda_possible  # noqa: E402


def _deployments(app) -> dict:
    """name -> Deployment, as Serve builds them for `serve.run` (options, user_config, init kwargs)."""
    from ray.serve._private.build_app import build_app as serve_build

    return {d.name: d for d in serve_build(app, name="t").deployments}


def test_build_app_asks_ray_for_a_gpu_on_cuda_and_keeps_the_cpu_defaults(tmp_path, monkeypatch):
    from deploy.app import BackboneConfig, build_app

    for var in ("TLPIPE_SERVE_DEVICE", "TLPIPE_SERVE_DTYPE", "TLPIPE_SERVE_GPUS_PER_REPLICA"):
        monkeypatch.delenv(var, raising=False)
    root = str(tmp_path)
    cpu_defaults = BackboneConfig().model_dump()

    cpu = _deployments(build_app("m@champion", state_root=root, device="cpu"))
    assert "num_gpus" not in cpu["Backbone"].ray_actor_options
    assert cpu["Backbone"].user_config == cpu_defaults  # max_batch_size 16, 10 ms: unchanged
    assert (cpu["Backbone"].init_kwargs["device"], cpu["Backbone"].init_kwargs["dtype"]) == ("cpu", "float32")

    gpu = _deployments(build_app("m@champion", state_root=root, device="cuda"))
    b = gpu["Backbone"]
    assert b.ray_actor_options == {"num_cpus": 1, "num_gpus": 1.0}
    assert b.user_config == {**cpu_defaults, "max_batch_size": 64, "batch_wait_timeout_s": 0.005}
    assert b.max_ongoing_requests >= 2 * 64  # two full batches in flight
    assert (b.init_kwargs["device"], b.init_kwargs["dtype"]) == ("cuda", "auto")  # bf16/fp16 decided on the GPU
    assert "num_gpus" not in gpu["Ingress"].ray_actor_options  # the ingress decodes on CPUs

    # settings from the environment (a fraction of a GPU), explicit options and batch arguments win
    monkeypatch.setenv("TLPIPE_SERVE_GPUS_PER_REPLICA", "0.5")
    gpu = _deployments(build_app(["a@champion", "b@champion"], state_root=root, device="cuda", dtype="float16",
                                 max_batch_size=32, backbone_options={"ray_actor_options": {"num_cpus": 2}}))
    b = gpu["Backbone"]
    assert b.ray_actor_options == {"num_cpus": 2, "num_gpus": 0.5}
    assert b.user_config["max_batch_size"] == 32 and b.user_config["batch_wait_timeout_s"] == 0.005
    assert b.init_kwargs["dtype"] == "float16"

    # colocated on a GPU: the ingress replica holds the backbone, so it reserves the GPU
    gpu = _deployments(build_app("m@champion", state_root=root, device="cuda", colocate_backbone=True))
    assert set(gpu) == {"Ingress"}
    ingress = gpu["Ingress"]
    assert ingress.ray_actor_options["num_gpus"] == 0.5
    assert ingress.user_config["max_batch_size"] == 64
    assert ingress.init_kwargs["colocated"]["device"] == "cuda"


def test_device_settings_refuse_what_cannot_run():
    from deploy.backbone import backbone_dtype
    from deploy.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="engine='openvino' runs on CPU") as err:
        load_settings({"device": "cuda", "engine": "openvino", "admin_token": "s3cret"}, environ={})
    assert "s3cret" not in str(err.value)  # an error across fields quotes no input
    with pytest.raises(SettingsError, match="dtype='bfloat16' is for device cuda"):
        load_settings({"device": "cpu", "dtype": "bfloat16"}, environ={})
    with pytest.raises(SettingsError, match="device must be one of"):
        load_settings({"device": "gpu"}, environ={})
    assert load_settings({}, environ={"TLPIPE_SERVE_DEVICE": "CUDA"}).device == "cuda"
    assert load_settings({"engine": "onnx"}, environ={}).backbone_device() == "cpu"  # auto: where onnx runs
    assert backbone_dtype("cpu", "auto") == "float32"
    assert backbone_dtype("cuda", "float16") == "float16"


def test_serve_device_cuda_without_a_gpu_is_one_error_line(tmp_path):
    """In a fresh process (a Ray already running in this one would be joined as a cluster, whose
    GPUs may be elsewhere): one `error:` line, exit 2, before Ray starts or a model is looked up."""
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TLPIPE_SERVE_DEVICE")}
    res = subprocess.run([sys.executable, "-m", "cli.app", "serve", "--model", "m@champion", "--device", "cuda",
                          "--root", str(tmp_path), "--port", str(free_port())],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "no CUDA GPU is visible" in errors[0] and "--device cpu" in errors[0], errors[0]


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_possible(), reason="needs a CUDA GPU")  # before Ray starts for nothing
def test_backbone_deployment_on_cuda_matches_cpu_fp32(ray_serve, lite0_64, cifar10_dir):
    """A real Backbone deployment on CUDA (num_gpus from `gpu_options`, bf16 or fp16 autocast)
    embeds real photos like the CPU fp32 engine: cosine >= 0.99 per image."""
    import torch
    from ray import serve

    from deploy.app import Backbone, gpu_options
    from deploy.backbone import BackbonePool, backbone_dtype, spec_key
    from pipeline.preprocess import load_pixels

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    photos = sorted((cifar10_dir / "test" / "cat").glob("*.jpg"))[:16]
    pixels = np.stack([load_pixels(p, lite0_64) for p in photos])
    key = spec_key(lite0_64)
    want = BackbonePool("torch", device="cpu").embed_many([key], [pixels])[0].embeddings

    opts = gpu_options(Backbone, {"ray_actor_options": {"num_cpus": 0.1}}, 1.0, 64)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        handle = serve.run(Backbone.options(**opts).bind(engine="auto", device="cuda", dtype="auto"),
                           name="gpu-backbone", route_prefix=None, blocking=False)
        got = handle.embed.remote(key, pixels).result(timeout_s=300)
        info = handle.batching.remote().result(timeout_s=60)
    finally:
        serve.shutdown()
    assert (info["device"], info["dtype"]) == ("cuda", backbone_dtype("cuda", "auto"))
    assert info["dtype"] in ("bfloat16", "float16") and got.engine == "torch"
    assert got.embeddings.dtype == np.float32 and got.embeddings.shape == want.shape
    assert _cos_rows(want, got.embeddings).min() >= 0.99
