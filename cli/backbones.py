"""`tlpipe backbones list | show | add | remove`: the built-in catalogue plus weights folders
registered by name in the state root (``<root>/backbones.json``, see
`pipeline.backbones.named`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from cli.console import RootOpt, clean_errors, console, fail

backbones_app = typer.Typer(help="The backbone registry: built-in backbones and your own weights folders.",
                            no_args_is_help=True)

SetOpt = typer.Option([], "--set", help="Spec field FIELD=VALUE (repeat), e.g. --set arch=ViT-B-32 for an open_clip "
                                        "checkpoint, --set input_size=256; values are JSON, else text.")
FamilyOpt = typer.Option(None, "--family", help="Family the backbone is grouped under (default: from the model type).")


def parse_spec_sets(items: List[str]) -> dict:
    """``["arch=ViT-B-32", "input_size=256"]`` -> ``{"arch": "ViT-B-32", "input_size": 256}``."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r}: expected FIELD=VALUE, e.g. arch=ViT-B-32", param_hint="--set")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def use_root(root: Optional[Path]) -> None:
    """Resolve registered backbone names in this command's state root (`--root`)."""
    from pipeline.backbones.named import use_state_root

    use_state_root(root)


def _spec_for(name: str, family: Optional[str], sets: List[str]):
    """A registered / built-in name, or a folder (with `--family` / `--set` applied)."""
    from pipeline.backbones import get_spec
    from pipeline.backbones.folders import spec_from_folder
    from pipeline.backbones.hashing import is_local_path

    overrides = parse_spec_sets(sets)
    if is_local_path(name) and (overrides or family):
        return spec_from_folder(name, family=family, overrides=overrides)
    if overrides or family:
        fail("--set / --family apply to a folder path (or to `tlpipe backbones add`), not to a backbone name")
    return get_spec(name)


@backbones_app.command("list")
@clean_errors
def backbones_list(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
                   root: Optional[Path] = RootOpt) -> None:
    """Every backbone (built-in and registered), and whether its weights are on this machine."""
    from pipeline.backbones import list_specs, weights_available
    from pipeline.backbones.named import entries, registry_path

    use_root(root)
    registered = entries()
    rows = []
    for spec in list_specs():
        ok, why = weights_available(spec)
        rows.append(dict(name=spec.name, family=spec.family, source=spec.source,
                         params_m=spec.params_m, input_size=spec.input_size, embed_dim=spec.embed_dim,
                         text=spec.text, available=ok, reason=why,
                         registered=registered[spec.name]["path"] if spec.name in registered else None))
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} backbones ({len(registered)} registered in {registry_path()})")
    for col in ("name", "family", "source", "params (M)", "input", "dim", "text", "weights here", "registered folder"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["family"], r["source"],
                      f"{r['params_m']:.1f}" if r["params_m"] else "?", str(r["input_size"]),
                      str(r["embed_dim"] or "?"), "yes" if r["text"] else "",
                      "[green]yes[/]" if r["available"] else "[yellow]no[/]", r["registered"] or "")
    console.print(table)


@backbones_app.command("show")
@clean_errors
def backbones_show(name: str = typer.Argument(..., help="Backbone name, registered name, or weights folder."),
                   family: Optional[str] = FamilyOpt, set_fields: List[str] = SetOpt,
                   root: Optional[Path] = RootOpt) -> None:
    """The full spec of one backbone or weights folder: what was derived, its fingerprint, and
    whether its weights are here (unknown names list what exists)."""
    from dataclasses import asdict

    from pipeline.backbones import weights_available

    use_root(root)
    try:
        spec = _spec_for(name, family, set_fields)
    except (KeyError, ValueError) as exc:
        fail(exc.args[0] if exc.args else str(exc))
    ok, why = weights_available(spec)
    d = asdict(spec)
    d["fingerprint"] = spec.fingerprint
    d["weights_available"] = ok
    if why:
        d["weights_note"] = why
    console.print_json(json.dumps(d, default=str))


@backbones_app.command("add")
@clean_errors
def backbones_add(name: str = typer.Argument(..., help="Name to use with --backbones (NAME or family/NAME)."),
                  path: Path = typer.Argument(..., help="The weights folder (transformers, open_clip or timm)."),
                  family: Optional[str] = FamilyOpt, set_fields: List[str] = SetOpt,
                  replace: bool = typer.Option(False, "--replace", help="Overwrite a registration of the same name."),
                  root: Optional[Path] = RootOpt) -> None:
    """Register a weights folder under a name, in the state root (every command, and jobs that
    share the state root, then accept `--backbones NAME`)."""
    from pipeline.backbones import weights_available
    from pipeline.backbones.catalogue import builtin_names
    from pipeline.backbones.named import add, registry_path

    use_root(root)
    try:
        spec = add(name, path, family=family, overrides=parse_spec_sets(set_fields), reserved=builtin_names(),
                   replace=replace)
    except (KeyError, ValueError) as exc:
        fail(exc.args[0] if exc.args else str(exc))
    ok, why = weights_available(spec)
    console.print(f"registered [bold]{spec.name}[/] → {spec.weights} in {registry_path()}")
    console.print(f"  {spec.source} {spec.arch}, {spec.input_size} px, mean {list(spec.mean)}, std {list(spec.std)}, "
                  f"{spec.interpolation}, crop_pct {spec.crop_pct:g} ({spec.crop_mode})"
                  + (", text tower (zero-shot)" if spec.text else ""))
    console.print(f"  fingerprint {spec.fingerprint[:16]}" + ("" if ok else f"; [yellow]weights: {why}[/]"))
    console.print(f"use it with: tlpipe run DATA --backbones {spec.name}")


@backbones_app.command("remove")
@clean_errors
def backbones_remove(name: str = typer.Argument(..., help="A registered name."),
                     root: Optional[Path] = RootOpt) -> None:
    """Forget a registered name (the folder and its cached features are left alone)."""
    from pipeline.backbones.named import remove

    use_root(root)
    try:
        full = remove(name)
    except (KeyError, ValueError) as exc:
        fail(exc.args[0] if exc.args else str(exc))
    console.print(f"removed {full}")
