"""The `tlpipe` command line (typer + rich). Thin: every command calls into pipeline/ or jobs/."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="tlpipe",
    help="Transfer-learning pipeline: validate a labelled image folder, extract embeddings with "
    "frozen backbones, probe, select and serve.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
backbones_app = typer.Typer(help="The backbone registry.", no_args_is_help=True)
features_app = typer.Typer(help="The content-addressed feature store.", no_args_is_help=True)
app.add_typer(backbones_app, name="backbones")
app.add_typer(features_app, name="features")

console = Console()

RootOpt = typer.Option(None, "--root", help="State root (default $TLPIPE_HOME or ./.tlpipe).")


def state_root(root: Optional[Path]) -> Path:
    return Path(root or os.environ.get("TLPIPE_HOME") or ".tlpipe")


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)


def _load(data: str, seed: int, max_pixels: Optional[int]):
    from pipeline.data import DatasetError, load_dataset
    from pipeline.images import DEFAULT_MAX_PIXELS

    from pipeline.archives import is_archive, unpack

    try:
        if is_archive(data):
            data = str(unpack(data))
        return load_dataset(data, seed=seed, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    except (DatasetError, FileNotFoundError) as exc:
        _fail(str(exc))


@app.command()
def validate(
    data: str = typer.Argument(..., help="ImageFolder dir, CSV/JSONL manifest, HF dataset dir, or archive."),
    seed: int = typer.Option(0, help="Seed of the stratified split when the data has no split folders."),
    max_pixels: Optional[int] = typer.Option(None, help="Decompression-bomb limit (pixels per image)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the dataset card as JSON here."),
) -> None:
    """Check every file, split, and print the dataset card."""
    ds = _load(data, seed, max_pixels)
    console.print(ds.card.render())
    if json_out:
        json_out.write_text(json.dumps(ds.card.to_dict(), indent=2))
        console.print(f"card written to {json_out}")


@app.command()
def extract(
    data: str = typer.Argument(..., help="Dataset (as for `tlpipe validate`)."),
    backbones: List[str] = typer.Option(
        ["efficientnet/tf_efficientnet_lite0.in1k"], "--backbone", "-b", help="Backbone names (repeat)."
    ),
    engine: str = typer.Option("auto", help="auto | torch | onnx"),
    layout: str = typer.Option("fused", help="fused (decode inside model actors) | tasks (separate decode tasks)"),
    batch_size: int = typer.Option(32, help="Images per forward pass."),
    seed: int = typer.Option(0),
    root: Optional[Path] = RootOpt,
) -> None:
    """Embed the dataset with each backbone; only images not yet in the feature store are computed."""
    from feature_store import FeatureStore

    ds = _load(data, seed, None)
    console.print(ds.card.render())
    stats = _extract_with_progress(ds, backbones, FeatureStore(state_root(root) / "features"),
                                   engine=engine, layout=layout, micro_batch=batch_size)
    console.print(stats_table(stats))


def _extract_with_progress(ds, backbones, store, **kw):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from jobs.extract import extract_features

    files = [(r.sha256, r.path) for r in ds.records]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=False) as progress:
        tasks: dict[str, int] = {}

        def on_progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(f"extract {name}", total=max(total, 1))
                if total == 0:
                    progress.update(tasks[name], completed=1, description=f"cached  {name}")
            progress.update(tasks[name], completed=done if total else 1)

        return extract_features(files, backbones, store=store, on_progress=on_progress, **kw)


def stats_table(stats) -> Table:
    table = Table(title="feature extraction")
    for col in ("backbone", "engine", "images", "cached", "extracted", "failed", "seconds", "img/s"):
        table.add_column(col, justify="left" if col in ("backbone", "engine") else "right")
    for s in stats:
        table.add_row(s.backbone, s.engine, str(s.requested), str(s.cached), str(s.extracted),
                      str(len(s.failed)), f"{s.seconds:.1f}", f"{s.images_per_s:.1f}")
    return table


@backbones_app.command("list")
def backbones_list(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Every registered backbone, and whether its weights are available on this machine."""
    from pipeline.backbones import list_specs, weights_available

    rows = []
    for spec in list_specs():
        ok, why = weights_available(spec)
        rows.append(dict(name=spec.name, family=spec.family, source=spec.source,
                         params_m=spec.params_m, input_size=spec.input_size,
                         embed_dim=spec.embed_dim, available=ok, reason=why))
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} backbones")
    for col in ("name", "family", "source", "params (M)", "input", "dim", "weights here"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["family"], r["source"],
                      f"{r['params_m']:.1f}" if r["params_m"] else "?", str(r["input_size"]),
                      str(r["embed_dim"]), "[green]yes[/]" if r["available"] else "[yellow]no[/]")
    console.print(table)


@backbones_app.command("show")
def backbones_show(name: str) -> None:
    """The full spec of one backbone (unknown names list what exists)."""
    from dataclasses import asdict

    from pipeline.backbones import get_spec, weights_available

    try:
        spec = get_spec(name)
    except (KeyError, ValueError) as exc:
        _fail(exc.args[0] if exc.args else str(exc))
    ok, why = weights_available(spec)
    d = asdict(spec)
    d["fingerprint"] = spec.fingerprint
    d["weights_available"] = ok
    if why:
        d["weights_note"] = why
    console.print_json(json.dumps(d, default=str))


@features_app.command("ls")
def features_ls(root: Optional[Path] = RootOpt) -> None:
    """Feature sets in the store: backbone, fingerprint, rows, shards, size."""
    from feature_store import FeatureStore

    infos = FeatureStore(state_root(root) / "features").ls()
    table = Table(title=f"feature store {state_root(root) / 'features'}")
    for col in ("backbone", "fingerprint", "dim", "rows", "shards", "MB"):
        table.add_column(col)
    for i in infos:
        table.add_row(str(i.backbone), i.fingerprint[:16], str(i.dim), str(i.rows), str(i.shards),
                      f"{i.bytes / 1e6:.1f}")
    console.print(table)


@features_app.command("gc")
def features_gc(
    keep: List[str] = typer.Option([], "--keep", help="Fingerprints (or prefixes) to keep; default keeps all sets."),
    dry_run: bool = typer.Option(False, "--dry-run"),
    root: Optional[Path] = RootOpt,
) -> None:
    """Remove interrupted writes and corrupt shards, and feature sets not kept."""
    from feature_store import FeatureStore

    store = FeatureStore(state_root(root) / "features")
    keep_fps = None
    if keep:
        keep_fps = [i.fingerprint for i in store.ls() if any(i.fingerprint.startswith(k) for k in keep)]
    report = store.gc(keep_fingerprints=keep_fps, dry_run=dry_run)
    console.print(report)


@app.command()
def demo(data: Path = typer.Option(Path("../shared/data/clothing-small.tar.gz"), help="Dataset or archive.")) -> None:
    """The offline end-to-end demo (what `make demo` runs)."""
    from jobs.demo import main as demo_main

    demo_main(str(data))


if __name__ == "__main__":
    app()
