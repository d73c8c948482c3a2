"""`tlpipe suggest`: suggested new classes from a served model's captured uncertain traffic."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.console import RootOpt, clean_errors, console, fail, state_root


@clean_errors
def suggest(
    model: str = typer.Argument(..., help="The served model: NAME@alias, NAME/version or a predictor dir."),
    capture: Optional[str] = typer.Option(None, "--capture", help="Capture folder or fsspec URL (default: "
                                          "<root>/serve/<model>/capture, what `tlpipe serve --capture auto` writes)."),
    min_cluster_size: int = typer.Option(5, min=2, help="Fewest images a suggested class has (HDBSCAN)."),
    accept: Optional[int] = typer.Option(None, "--accept", help="Accept this cluster of the last suggestions."),
    label: Optional[str] = typer.Option(None, "--label", help="Class name for --accept."),
    export: Optional[Path] = typer.Option(None, help="Labelled folder the accepted images are copied to "
                                          "(default <root>/serve/<model>/accepted)."),
    root: Optional[Path] = RootOpt,
) -> None:
    """Cluster captured fallback/abstain images into suggested classes (HTML page), or --accept one."""
    from deploy.model_source import ModelSourceError
    from deploy.settings import load_settings
    from deploy.suggestions import SuggestError, accept_cluster, suggest_classes
    from jobs.tracking import tracking_uri_for

    settings = load_settings({"model": model, "state_root": str(state_root(root)),
                              "tracking_uri": tracking_uri_for(state_root(root))})
    try:
        if accept is not None:
            if not label:
                fail("--accept needs --label NAME: the new class's name")
            res = accept_cluster(settings, accept, label, capture=capture, export=export)
            console.print(f"class [bold]{res.label}[/]: {res.added} support example(s) added "
                          f"({res.duplicates} already there) in {res.store}; a running server answers it "
                          "after its next registry poll")
            console.print(f"labelled copy for the next `tlpipe run`: {res.exported}")
            return
        res = suggest_classes(settings, capture=capture, min_cluster_size=min_cluster_size)
    except (SuggestError, ModelSourceError) as exc:
        fail(str(exc))
        return
    console.print(f"{res.records} captured image(s) of {res.model}: {len(res.suggestions)} cluster(s)")
    for s in res.suggestions:
        near = ", ".join(f"{n['label']} {n['share']:.0%}" for n in s.nearest) or "-"
        alike = f" — looks like {s.looks_like} (hard {s.looks_like} photos, not a new class?)" if s.looks_like else ""
        console.print(f"  cluster {s.cluster}: {s.size} images; nearest known: {near}{alike}")
    console.print(f"review: {res.html}")
    if res.suggestions:
        console.print(f"accept: tlpipe suggest {model} --accept 0 --label NAME")
