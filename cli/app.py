"""The `tlpipe` command line (typer + rich). Thin: every command calls into pipeline/, jobs/ or
deploy/ (the CLI is the one package above deploy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from cli.backbones import backbones_app, use_root
from cli.console import (
    RootOpt,
    clean_errors,
    console,
    fail,
    leaderboard_table,
    load_dataset_arg,
    print_promotion,
    skipped_backbone_lines,
    state_root,
    stats_table,
)
from cli.next_steps import threshold_lines
from cli.quick_exit import run_and_exit
from cli.suggest import suggest as suggest_command
from pipeline import settings
from pipeline.sweep.plan import DEFAULT_HEADS

app = typer.Typer(
    name="tlpipe",
    help="Transfer-learning pipeline: validate a labelled image folder, extract embeddings with "
    "frozen backbones, probe, select and serve.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
features_app = typer.Typer(help="The content-addressed feature store.", no_args_is_help=True)
app.add_typer(backbones_app, name="backbones")
app.add_typer(features_app, name="features")


@app.command()
@clean_errors
def validate(
    data: str = typer.Argument(..., help="ImageFolder dir, CSV/JSONL manifest, HF dataset dir, or archive."),
    seed: int = typer.Option(0, help="Seed of the stratified split when the data has no split folders."),
    max_pixels: Optional[int] = typer.Option(None, help="Decompression-bomb limit (pixels per image)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the dataset card as JSON here."),
) -> None:
    """Check every file, split, and print the dataset card."""
    ds = load_dataset_arg(data, seed, max_pixels)
    console.print(ds.card.render())
    if json_out:
        json_out.write_text(json.dumps(ds.card.to_dict(), indent=2))
        console.print(f"card written to {json_out}")


@app.command()
@clean_errors
def extract(
    data: str = typer.Argument(..., help="Dataset (as for `tlpipe validate`)."),
    backbones: List[str] = typer.Option(
        ["efficientnet/tf_efficientnet_lite0.in1k"], "--backbone", "-b", help="Backbone names (repeat)."
    ),
    engine: str = typer.Option("auto", help="auto | torch | onnx | openvino"),
    layout: str = typer.Option("fused", help="fused (decode inside model actors) | tasks (separate decode tasks)"),
    batch_size: Optional[int] = typer.Option(None, help="Images per forward pass (default: per engine)."),
    seed: int = typer.Option(0),
    root: Optional[Path] = RootOpt,
) -> None:
    """Embed the dataset with each backbone; only images not yet in the feature store are computed."""
    from feature_store import FeatureStore

    use_root(root)  # registered backbone names live in the state root
    ds = load_dataset_arg(data, seed, None)
    console.print(ds.card.render())
    stats = _extract_with_progress(ds, backbones, FeatureStore(settings.features_root(root)),
                                   engine=engine, layout=layout, micro_batch=batch_size)
    console.print(stats_table(stats))


def _extract_with_progress(ds, backbones, store, **kw):
    from jobs.extract import extract_features
    from jobs.progress import StageProgress

    files = [(r.sha256, r.path) for r in ds.records]
    with StageProgress(console) as progress:  # bars on a terminal, plain lines in a log
        return extract_features(files, backbones, store=store, on_progress=progress.extract, **kw)


@features_app.command("ls")
@clean_errors
def features_ls(root: Optional[Path] = RootOpt) -> None:
    """Feature sets in the store: backbone, fingerprint, rows, shards, size."""
    from feature_store import FeatureStore

    infos = FeatureStore(settings.features_root(root)).ls()
    table = Table(title=f"feature store {settings.features_root(root)}")
    for col in ("backbone", "fingerprint", "dim", "rows", "shards", "MB"):
        table.add_column(col)
    for i in infos:
        table.add_row(str(i.backbone), i.fingerprint[:16], str(i.dim), str(i.rows), str(i.shards),
                      f"{i.bytes / 1e6:.1f}")
    console.print(table)


@features_app.command("gc")
@clean_errors
def features_gc(
    keep: List[str] = typer.Option([], "--keep", help="Fingerprints (or prefixes) to keep; default keeps all sets."),
    dry_run: bool = typer.Option(False, "--dry-run"),
    root: Optional[Path] = RootOpt,
) -> None:
    """Remove interrupted writes and corrupt shards, and feature sets not kept."""
    from feature_store import FeatureStore

    store = FeatureStore(settings.features_root(root))
    keep_fps = None
    if keep:
        keep_fps = [i.fingerprint for i in store.ls() if any(i.fingerprint.startswith(k) for k in keep)]
    report = store.gc(keep_fingerprints=keep_fps, dry_run=dry_run)
    console.print(report)


def _csv_list(values: List[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def parse_head_params(items: List[str]) -> dict[str, dict]:
    """``["lora.epochs=3", "lora.lr=5e-4", "linear.class_weight=\"balanced\""]`` →
    ``{"lora": {"epochs": 3, "lr": 0.0005}, ...}``. Values are JSON (numbers, true/false, null,
    lists, quoted strings); anything that is not valid JSON is taken as a plain string."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        head, dot, name = key.strip().partition(".")
        if not sep or not dot or not head or not name:
            raise typer.BadParameter(f"{item!r}: expected HEAD.PARAM=VALUE, e.g. lora.epochs=3 or lora.lr=5e-4",
                                     param_hint="--set")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out.setdefault(head, {})[name] = value
    return out


def check_head_params(heads: list[str], head_params: dict[str, dict]) -> None:
    """Fail before any work when --heads names an unknown head, or a --set names a head not in
    --heads or a parameter that head does not take (fine-tunes: `pipeline.finetune.FinetuneConfig`
    fields + the Ray Train job keys)."""
    from jobs.finetune import JOB_PARAMS
    from pipeline.fields import field_names
    from pipeline.finetune import FinetuneConfig
    from pipeline.heads import HEADS
    from pipeline.sweep.plan import FINETUNE_HEADS, init_params, resolve_head, resolve_heads

    try:
        resolve_heads(heads, None)
    except ValueError as e:
        raise typer.BadParameter(f"{e}; or lora / full to fine-tune", param_hint="--heads")
    for label, params in head_params.items():
        if label not in heads:
            raise typer.BadParameter(f"--set {label}.…: {label!r} is not among --heads {heads}", param_hint="--set")
        if label.lower() in FINETUNE_HEADS:
            known = field_names(FinetuneConfig) | set(JOB_PARAMS)
        else:
            known = init_params(HEADS[resolve_head(label)])
        unknown = sorted(set(params) - known)
        if unknown:
            raise typer.BadParameter(f"{label} takes no parameter {unknown}; it takes {sorted(known)}",
                                     param_hint="--set")


@app.command()
@clean_errors
def run(
    data: str = typer.Argument(..., help="Dataset: folder, manifest, HF dataset dir or archive."),
    backbones: List[str] = typer.Option([], "--backbones", "-b", help="Backbones (comma list or repeat); default: all with weights here."),
    heads: List[str] = typer.Option([",".join(DEFAULT_HEADS)], "--heads", help="Heads: linear, knn, centroid, mlp, tip, zeroshot; lora / full fine-tune the backbone (Ray Train)."),
    max_latency_ms: Optional[float] = typer.Option(None, help="Latency budget per image (batch 1) on this machine."),
    max_params: Optional[float] = typer.Option(None, "--max-params", help="Size budget in millions of parameters."),
    precision: List[str] = typer.Option([], "--precision", help="Backbone precisions to try (comma list): fp32, int8 (post-training quantized on a seeded sample of <= 300 training images; CPU, openvino/onnx). Default fp32."),
    sizes: List[str] = typer.Option([], "--sizes", help="Input sizes to evaluate each backbone's weights at (comma list, e.g. 160,192,224); default: each backbone's own."),
    set_params: List[str] = typer.Option([], "--set", help="Head / fine-tune parameter HEAD.PARAM=VALUE (repeat), e.g. --set lora.epochs=3 --set lora.lr=5e-4 --set lora.num_workers=2 --set linear.class_weight=balanced."),
    metric: str = typer.Option("balanced_accuracy", help="Selection metric (multi-label data: map (default), micro_f1, macro_f1, subset_accuracy)."),
    tolerance: float = typer.Option(0.005, help="Selection metric a cheaper candidate may lose and still win (paired test; 0.005 = half a point)."),
    selection: str = typer.Option("auto", help="Score candidates by k-fold CV on train+val ('cv'), on the validation split ('val'), or 'auto' (CV up to 20k images)."),
    ensembles: bool = typer.Option(True, "--ensembles/--no-ensembles", help="Also try a head on the concatenated backbones and a weighted ensemble of the best candidates."),
    target_precision: float = typer.Option(0.9, help="Precision the confidence threshold is calibrated for."),
    model_name: Optional[str] = typer.Option(None, help="Registered model name (default: the dataset's name)."),
    promote_after: bool = typer.Option(False, "--promote", help="Promote the challenger if it beats the champion."),
    seed: int = typer.Option(0),
    root: Optional[Path] = RootOpt,
    multi_label: Optional[bool] = typer.Option(None, "--multi-label/--no-multi-label", help="Images carry label sets (default: detected from a `labels` manifest column, JSONL lists or a HF Sequence(ClassLabel)); multi-label runs sweep one-vs-rest linear, k-NN voting and sigmoid MLP heads."),
    label_separator: str = typer.Option("|", help="Separator of the labels in one manifest cell (multi-label CSV)."),
) -> None:
    """validate → extract → sweep → select → register (alias `challenger`)."""
    from jobs.run import run as run_job

    from pipeline.backbones.variants import parse_precisions, parse_sizes

    head_params = parse_head_params(set_params)
    check_head_params(_csv_list(heads), head_params)
    try:
        precisions, input_sizes = parse_precisions(precision), parse_sizes(sizes)
    except ValueError as e:
        fail(str(e))
    use_root(root)  # registered backbone names live in the state root
    from jobs.progress import StageProgress

    with StageProgress(console) as progress:  # bars on a terminal, plain lines in a log
        result = run_job(data, root=state_root(root), backbones=_csv_list(backbones) or None,
                         heads=_csv_list(heads), head_params=head_params or None,
                         max_latency_ms=max_latency_ms, max_params_m=max_params,
                         selection_metric=metric, tolerance=tolerance, selection=selection,
                         ensembles=ensembles, target_precision=target_precision,
                         model_name=model_name, seed=seed, on_progress=progress.extract,
                         on_sweep_progress=progress.sweep, precisions=precisions,
                         sizes=input_sizes, multi_label=multi_label,
                         label_separator=label_separator,
                         on_dataset=lambda ds: console.print(ds.card.render()))
    console.print(stats_table(result.extract_stats))
    for line in skipped_backbone_lines(result.skipped_backbones):
        console.print(line)
    for s in result.sweep.skipped:
        console.print(f"[yellow]skipped[/] {s.get('backbone')} × {s.get('head')}: {s.get('reason')}")
    console.print(leaderboard_table(result.sweep.rows, f"sweep {result.sweep.parent_run_id}"))
    sel = result.sweep.selection
    console.print(f"[bold]selection:[/] {sel['why'] if sel else result.sweep.selection_error}")
    console.print(f"report: {result.sweep.report_path}")
    if result.version:
        console.print(f"registered [bold]{result.model_name}[/] version {result.version} as @challenger")
        for line in threshold_lines(result.calibration):
            console.print(line)
        test = (result.evaluation or {}).get("test")
        if test:  # multi-label: the test split scored once (reported, never used for choosing)
            console.print(f"test split: mAP {test['map']:.3f}, micro-F1 {test['micro_f1']:.3f}, "
                          f"macro-F1 {test['macro_f1']:.3f}, subset accuracy "
                          f"{test['subset_accuracy']:.3f} at the per-label thresholds")
        if promote_after:
            print_promotion(result.model_name, None, False, root)
        from cli.next_steps import print_after_run

        print_after_run(console, result, state_root(root))
    else:  # nothing to serve: say why and exit non-zero, so scripts and CI notice
        fail(f"no model registered: {result.sweep.selection_error or 'no candidate finished'}", code=1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    data: str = typer.Argument(..., help="Dataset path as the cluster sees it (a local one is made absolute)."),
    address: Optional[str] = typer.Option(
        None, help="Ray Jobs API, e.g. http://HEAD:8265 (default $RAY_ADDRESS if http, else http://127.0.0.1:8265)."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the job's logs and exit with its status."),
    submission_id: Optional[str] = typer.Option(None, help="Job id to use (default: Ray makes one)."),
) -> None:
    """Submit `tlpipe run DATA ...` to a Ray cluster as a job (Ray's Jobs API).

    Every option that is not one of these goes to `tlpipe run` on the cluster."""
    from jobs.submit import SubmitError, submit_run

    try:
        job_id, status = submit_run(data, list(ctx.args), address=address, wait=wait,
                                    submission_id=submission_id, echo=lambda line: print(line, flush=True))
    except SubmitError as exc:
        fail(str(exc))
    if wait:
        print(f"job {job_id}: {status}", flush=True)
        if status != "SUCCEEDED":
            raise typer.Exit(1)


@app.command()
@clean_errors
def compare(sweep: Optional[str] = typer.Argument(None, help="Sweep (parent run) id; default the latest."),
            root: Optional[Path] = RootOpt) -> None:
    """Print the leaderboard of a past sweep from MLflow."""
    from jobs.leaderboard import compare as compare_rows

    try:
        rows = compare_rows(state_root(root), sweep)
    except (LookupError, ValueError) as exc:
        fail(str(exc))
    console.print(leaderboard_table(rows, f"sweep {sweep or '(latest)'}"))
    if not any(r.get("selection_score") is not None for r in rows) \
            and any(r.get("status") == "FINISHED" for r in rows):
        # Finished runs without a selection score come from sweeps that chose on the test split.
        console.print("[dim]no selection scores in this sweep: it was logged before selection "
                      "used cross-validation, and its winner was chosen on the test split[/]")


@app.command()
@clean_errors
def promote(model: str = typer.Argument(..., help="Registered model name."),
            version: Optional[str] = typer.Option(None, help="Version to promote (default: @challenger)."),
            force: bool = typer.Option(False, "--force", help="Promote even if it does not beat the champion."),
            root: Optional[Path] = RootOpt) -> None:
    """Move @champion to the challenger if it beats the champion on the same test split."""
    print_promotion(model, version, force, root)


@app.command()
@clean_errors
def ui(port: int = typer.Option(5000), host: str = typer.Option("127.0.0.1"), root: Optional[Path] = RootOpt) -> None:
    """Open the MLflow UI on the project's store."""
    import subprocess
    import sys

    from jobs.tracking import tracking_uri_for

    uri = tracking_uri_for(state_root(root))
    if uri.lower().startswith(("http://", "https://")):  # a tracking server serves its own UI
        console.print(f"the runs are on the MLflow tracking server {uri}: open it in a browser")
        return
    console.print(f"MLflow UI on http://{host}:{port} (store {uri})")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    raise typer.Exit(subprocess.call(cmd))


@app.command()
@clean_errors
def predict(images: List[Path] = typer.Argument(..., help="Image files, or folders (every image under them)."),
            model: str = typer.Option(..., "--model", help="NAME@alias, NAME/version, or a predictor dir."),
            as_json: bool = typer.Option(False, "--json", help="Print a JSON list (one object per image, "
                                         "with `labels`) instead of the table."),
            root: Optional[Path] = RootOpt) -> None:
    """Classify images with a registered model (in process, no server), in batches; an image
    that cannot be read is an `error` row. A multi-label model answers a list of labels per
    image (empty when it abstains)."""
    from jobs.registry import alias_version, predictor_path
    from jobs.tracking import setup_mlflow
    from pipeline.batch_predict import image_files, predict_each
    from pipeline.images import IMAGE_EXTENSIONS, ImageValidationError
    from pipeline.multilabel.predictor import MULTILABEL_TASK, answered_labels, load_any_predictor, task_of

    paths = image_files(images)
    if not paths:
        fail(f"no image files under {', '.join(map(str, images))}: looked for {', '.join(sorted(IMAGE_EXTENSIONS))}")
    if Path(model).is_dir():
        pdir = Path(model)
    else:
        setup_mlflow(state_root(root), settings.DEFAULT_EXPERIMENT)
        name, sep, ref = model.partition("@") if "@" in model else model.partition("/")
        version = alias_version(name, ref or "champion") if sep != "/" else ref
        if not version:
            fail(f"{model}: no such model version or alias")
        pdir = predictor_path(name, version)
    predictor = load_any_predictor(pdir)
    multilabel = task_of(predictor) == MULTILABEL_TASK
    table = Table(title=f"predictions ({model})")
    columns = ("labels",) if multilabel else ("label", "score")  # a multi-label answer: a list
    for col in ("image", *columns, "decision", "top-3"):
        table.add_column(col)
    rows = []
    for path, p in zip(paths, predict_each(predictor, paths)):
        if isinstance(p, ImageValidationError):
            rows.append({"image": str(path), "error": str(p)})
            table.add_row(str(path), *["-"] * len(columns), "error", str(p))
            continue
        rows.append({"image": str(path), **p.to_dict(), "labels": answered_labels(p)})
        tops = ", ".join(f"{t['label']} {t['score']:.2f}" for t in p.top_k[:3])
        if multilabel:
            labels = ", ".join(f"{d['label']} {d['score']:.2f}" for d in p.labels) or "-"
            table.add_row(str(path), labels, p.decision, tops)
        else:
            table.add_row(str(path), str(p.label), f"{p.score:.3f}", p.decision, tops)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        console.print(table)


@app.command()
@clean_errors
def serve(
    model: List[str] = typer.Option(..., "--model", envvar="TLPIPE_SERVE_MODEL",
                                    help="NAME@alias (follows the alias), NAME/version, or a predictor dir. "
                                    "Repeat for several models on one endpoint: POST /v1/models/NAME/predict; "
                                    "models on the same backbone share its forward passes. "
                                    "From the environment: several separated by spaces."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    engine: Optional[str] = typer.Option(None, help="auto | torch | onnx | openvino (default auto)."),
    max_batch_size: Optional[int] = typer.Option(None),
    batch_wait_timeout_s: Optional[float] = typer.Option(None),
    intra_op_threads: Optional[int] = typer.Option(None, help="Backbone engine threads (OpenVINO / ONNX Runtime intra-op; default: the CPUs this process may use)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda: where the backbone runs (default auto: cuda when a GPU is visible)."),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16 on cuda (default auto: bfloat16 where supported, else float16)."),
    direct_ingress: Optional[bool] = typer.Option(
        None, "--direct-ingress/--via-proxy",
        help="The ingress replica answers HTTP itself (default on a local Ray) or through Serve's proxy."),
    colocate: Optional[bool] = typer.Option(
        None, "--colocate/--separate-backbone",
        help="Backbone inside the ingress replica (default on a local CPU-only Ray) or its own deployment."),
    capture: Optional[str] = typer.Option(
        None, "--capture", help="Capture fallback/abstain images + embeddings for `tlpipe suggest`: a folder, "
        "an fsspec URL, or 'auto' (<root>/serve/<model>/capture); with several models, DIR/<name> each."),
    root: Optional[Path] = RootOpt,
) -> None:
    """Serve a model on Ray Serve (local Ray unless RAY_ADDRESS names a cluster)."""
    from deploy.app import run as serve_run
    from deploy.model_source import ModelSourceError
    from deploy.preflight import ServeStartError
    from deploy.settings import SettingsError
    from jobs.tracking import tracking_uri_for

    from deploy.models import model_names

    try:
        model_names(model)  # a malformed or repeated reference: one line, before anything starts
    except ValueError as exc:
        fail(str(exc))
    console.print(f"serving {', '.join(model)} on http://{host}:{port} (docs at /docs)")
    try:
        serve_run(model if len(model) > 1 else model[0], host=host, port=port, tracking_uri=tracking_uri_for(state_root(root)),
                  state_root=str(state_root(root)), engine=engine, max_batch_size=max_batch_size,
                  batch_wait_timeout_s=batch_wait_timeout_s, intra_op_num_threads=intra_op_threads,
                  direct_ingress=direct_ingress, colocate_backbone=colocate, capture=capture, device=device,
                  dtype=dtype, blocking=True)
    except (ModelSourceError, ServeStartError, SettingsError) as exc:
        fail(str(exc))


app.command(name="suggest")(suggest_command)


@app.command()
@clean_errors
def demo(data: Path = typer.Option(Path("../shared/data/clothing-small.tar.gz"), help="Dataset or archive.")) -> None:
    """The offline end-to-end demo (what `make demo` runs)."""
    from cli.demo import main as demo_main

    demo_main(str(data))


def main() -> None:
    """The `tlpipe` command (see `cli.quick_exit`)."""
    run_and_exit(app)


if __name__ == "__main__":
    main()
