"""Deployment manifests: they parse, name real import paths, commands, options and config keys."""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _load(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path} is not a YAML mapping"
    return doc


def _import(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def check_serve_config(cfg: dict, where: str) -> None:
    """A Serve config that Serve accepts, whose names and keys exist in our code."""
    from ray.serve import Application
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    from deploy.app import (BACKBONE_DEPLOYMENT, INGRESS_DEPLOYMENT, AppArgs, BackboneConfig,
                            IngressConfig)

    ServeDeploySchema.model_validate(cfg)
    # ServeDeploySchema ignores unknown keys (forward compatibility): check them ourselves
    assert set(cfg) <= set(ServeDeploySchema.model_fields), f"{where}: unknown top-level keys"
    user_configs = {BACKBONE_DEPLOYMENT: BackboneConfig, INGRESS_DEPLOYMENT: IngressConfig}
    for app in cfg["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), f"{where}: unknown application keys"
        builder = _import(app["import_path"])
        assert callable(builder)
        args = AppArgs.model_validate(app.get("args", {}))  # the builder's typed arguments
        from deploy.settings import ServeSettings

        assert set(args.settings) <= set(ServeSettings.model_fields), f"{where}: unknown settings"
        assert "admin_token" not in args.settings, f"{where}: secrets belong in the environment"
        built = builder(args)
        assert isinstance(built, Application)
        settings = ServeSettings(**args.settings)
        # the deployment that runs the backbone: it holds the GPU on cuda
        runs_backbone = INGRESS_DEPLOYMENT if args.colocate_backbone else BACKBONE_DEPLOYMENT
        if settings.device == "cuda":
            assert serve_built(built)[runs_backbone].ray_actor_options["num_gpus"] == settings.gpus_per_replica
        names = set()
        for dep in app["deployments"]:
            assert set(dep) <= set(DeploymentSchema.model_fields), f"{where}: unknown keys in {dep['name']}"
            names.add(dep["name"])
            # the user_config must be accepted by the deployment's reconfigure() schema
            user_configs[dep["name"]].model_validate(dep.get("user_config") or {})
            if dep["name"] == BACKBONE_DEPLOYMENT and "user_config" in dep:
                assert dep["max_ongoing_requests"] >= dep["user_config"]["max_batch_size"]
            if dep["name"] == runs_backbone and "ray_actor_options" in dep:
                # Serve replaces the builder's ray_actor_options with these: they must keep the GPU
                gpus = dep["ray_actor_options"].get("num_gpus", 0)
                want_gpus = settings.gpus_per_replica if settings.device == "cuda" else 0
                assert gpus == want_gpus, f"{where}: {dep['name']} num_gpus {gpus} != {want_gpus} ({settings.device})"
            if dep["name"] == runs_backbone and settings.device == "cuda" and "user_config" in dep:
                assert dep["user_config"]["max_batch_size"] == settings.gpu_max_batch_size, where
                assert dep["user_config"]["batch_wait_timeout_s"] == settings.gpu_batch_wait_timeout_s, where
        # a colocated backbone runs in the ingress replicas: no Backbone deployment to configure
        want = {INGRESS_DEPLOYMENT} if args.colocate_backbone else set(user_configs)
        assert names == want, f"{where}: deployments {names} != {want}"


def serve_built(app) -> dict:
    """name -> Deployment as Serve builds them for `serve.run` / a config deploy (options,
    user_config, init arguments)."""
    from ray.serve._private.build_app import build_app as serve_build

    return {d.name: d for d in serve_build(app, name="t").deployments}


def test_serve_yaml():
    cfg = _load(DEPLOY / "serve.yaml")
    check_serve_config(cfg, "deploy/serve.yaml")
    assert cfg["applications"][0]["import_path"] == "deploy.app:app_builder"


def test_serve_gpu_yaml():
    """The GPU layout: the Backbone deployment reserves a GPU and batches for it, the ingress none."""
    cfg = _load(DEPLOY / "serve-gpu.yaml")
    check_serve_config(cfg, "deploy/serve-gpu.yaml")
    app = cfg["applications"][0]
    assert app["args"]["settings"]["device"] == "cuda" and not app["args"]["colocate_backbone"]
    deps = {d["name"]: d for d in app["deployments"]}
    assert "num_gpus" not in deps["Ingress"]["ray_actor_options"]


@pytest.mark.parametrize("manifest", ["serve.yaml", "serve-gpu.yaml", "kuberay/rayservice.yaml"])
def test_manifests_serve_several_models(manifest, tmp_path):
    """Each manifest's application, with two models under `models:` (what `tlpipe serve --model A
    --model B` does): Serve builds one app serving both, whose backbone has room for both."""
    from deploy.app import app_builder
    from deploy.backbone import DEFAULT_CAPACITY

    doc = _load(DEPLOY / manifest)
    cfg = yaml.safe_load(doc["spec"]["serveConfigV2"]) if doc.get("kind") == "RayService" else doc
    app = cfg["applications"][0]
    assert isinstance(app["args"]["models"], list), f"{manifest}: declare models as a list"
    args = {**app["args"], "models": ["clothing-small@champion", "clothing-small-int8@champion"],
            "state_root": str(tmp_path)}
    cfg["applications"][0]["args"] = args
    check_serve_config(cfg, manifest)
    deps = serve_built(app_builder(args))
    ingress = deps["Ingress"].init_kwargs
    assert ingress["models"] == args["models"] and ingress.get("model") is None
    if args.get("colocate_backbone"):
        assert set(deps) == {"Ingress"} and ingress["colocated"]["engine"] == args.get("engine")
    else:  # one Backbone deployment for both (the builder does not reach the registry)
        assert set(deps) == {"Ingress", "Backbone"}
        assert deps["Backbone"].init_kwargs["capacity"] == 2 * DEFAULT_CAPACITY
    with pytest.raises(ValueError, match="given twice"):
        app_builder({**args, "models": ["clothing-small@champion", "clothing-small/3"]})


def test_app_import_path_is_an_application():
    from ray.serve import Application

    assert isinstance(_import("deploy.app:app"), Application)


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_cluster(spec: dict, where: str) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion != installed Ray {ray.__version__}"
    groups = [spec["headGroupSpec"]] + list(spec.get("workerGroupSpecs", []))
    for g in groups:
        pod = g["template"]
        volumes = {v["name"] for v in pod["spec"].get("volumes", [])}
        for c in _containers(pod):
            assert c["image"] == "tlpipe:latest", f"{where}: image of {c['name']}"
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= volumes, f"{where}: {c['name']} mounts undeclared volumes {mounts - volumes}"
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["TLPIPE_HOME"]["value"] == "/state"
            assert "/state" in {m["mountPath"] for m in c["volumeMounts"]}
            for e in env.values():
                assert "value" in e or "valueFrom" in e
    for g in spec.get("workerGroupSpecs", []):
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_rayservice():
    doc = _load(DEPLOY / "kuberay" / "rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    check_serve_config(serve_cfg, "rayservice serveConfigV2")
    assert serve_cfg["applications"][0]["args"]["state_root"] == "/state"
    _check_cluster(doc["spec"]["rayClusterConfig"], "rayservice")
    head = _containers(doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"])[0]
    token = {e["name"]: e for e in head["env"]}["TLPIPE_SERVE_ADMIN_TOKEN"]
    assert "secretKeyRef" in token["valueFrom"], "the admin token must come from a Secret"
    assert 8000 in {p["containerPort"] for p in head["ports"]}


def test_rayjob_runs_a_real_cli_command():
    import typer.main

    from cli.app import app as cli

    doc = _load(DEPLOY / "kuberay" / "rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    _check_cluster(doc["spec"]["rayClusterSpec"], "rayjob")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "tlpipe"
    group = typer.main.get_command(cli)
    command = group.commands.get(argv[1])
    assert command is not None, f"`tlpipe {argv[1]}` does not exist (commands: {sorted(group.commands)})"
    options = {opt for p in command.params for opt in getattr(p, "opts", [])}
    used = {a for a in argv[2:] if a.startswith("--")}
    assert used <= options, f"unknown options {used - options} for `tlpipe {argv[1]}`"
    assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]["TLPIPE_HOME"] == "/state"


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        buf += (" " if buf else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            instr, _, rest = buf.partition(" ")
            out.append((instr.upper(), rest.strip()))
            buf = ""
    assert not buf, "dangling line continuation"
    return out


def test_dockerfile():
    import json
    import tomllib

    steps = _dockerfile(DEPLOY / "Dockerfile")
    known = {"FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "VOLUME", "EXPOSE", "HEALTHCHECK", "CMD", "ARG"}
    assert {i for i, _ in steps} <= known
    assert steps[0][0] == "FROM"
    python = steps[0][1].split(":")[1].split("-")[0]  # python:3.11-slim -> 3.11
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f">={python}" in requires or python in requires, f"base image Python {python} vs {requires}"
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"][
        "wheel"]["packages"]
    copied = set()
    for instr, args in steps:
        if instr == "COPY":
            *sources, _dest = args.split()
            for s in sources:
                assert (REPO / s).exists(), f"COPY source {s} does not exist"
                copied.add(s)
    assert set(packages) <= copied, f"the image lacks packages {set(packages) - copied}"
    cmd = json.loads(dict(steps)["CMD"])
    if cmd[:2] == ["serve", "run"]:
        assert (REPO / cmd[2]).is_file()
        port = _load(REPO / cmd[2])["http_options"]["port"]
    else:  # tlpipe serve --port P, models from TLPIPE_SERVE_MODEL: a real command of the CLI
        import typer.main

        from cli.app import app

        assert cmd[:2] == ["tlpipe", "serve"]
        command = typer.main.get_command(app).commands["serve"]
        options = {opt for p in command.params for opt in getattr(p, "opts", [])}
        used = {a for a in cmd[2:] if a.startswith("--")}
        assert used <= options, f"tlpipe serve has no options {used - options}"
        env = {k: v for i, v in steps if i == "ENV" for k in [v.split("=")[0]]}
        assert "TLPIPE_SERVE_MODEL" in env
        if "--model" not in cmd:  # the image's models come from the environment
            (model_opt,) = [p for p in command.params if "--model" in getattr(p, "opts", [])]
            assert model_opt.envvar == "TLPIPE_SERVE_MODEL"
        port = cmd[cmd.index("--port") + 1]
    assert str(port) in dict(steps)["EXPOSE"].split()
    assert "/healthz" in dict(steps)["HEALTHCHECK"]


@pytest.mark.parametrize("bad", [{"max_batch": 4}, {"max_batch_size": 0}, {"batch_wait_timeout_s": -1}])
def test_backbone_reconfigure_rejects_bad_user_config(bad):
    """The checks above are only as good as reconfigure's own validation."""
    import asyncio

    from pydantic import ValidationError

    from deploy.app import Backbone

    replica = Backbone.func_or_class(engine="torch")
    with pytest.raises(ValidationError):
        asyncio.run(replica.reconfigure(bad))


def test_backbone_reconfigure_sets_the_batch_parameters():
    import asyncio

    from deploy.app import Backbone

    replica = Backbone.func_or_class(engine="torch")
    asyncio.run(replica.reconfigure({"max_batch_size": 3, "batch_wait_timeout_s": 0.02}))
    assert replica.batching() == {"max_batch_size": 3, "batch_wait_timeout_s": 0.02, "forward_ms": 0.0,
                                  "loaded": [], "device": "cpu", "dtype": "float32"}


def test_serve_reads_several_models_from_the_environment(tmp_path):
    """The image's spelling, TLPIPE_SERVE_MODEL="A B": `tlpipe serve` gets two models (here the
    same name twice, refused as such before anything starts; one reference would be malformed)."""
    from typer.testing import CliRunner

    from cli.app import app

    res = CliRunner().invoke(app, ["serve", "--root", str(tmp_path)],
                             env={"TLPIPE_SERVE_MODEL": "m@champion m/2"})
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1, res.output
    assert "'m' is given twice (m@champion, m/2)" in errors[0], errors[0]
