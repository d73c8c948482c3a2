"""The commands to run next, printed at the end of `tlpipe run` and `make demo`: this run's model,
state root, a real test image and the report, each command runnable as printed from the
directory the run was started in."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path


def _shown(path: str | os.PathLike) -> str:
    """A path as the user can type it here: relative when under the working directory."""
    p = Path(path)
    if p.is_absolute() and Path.cwd() != Path("/"):
        try:
            rel = p.relative_to(Path.cwd())
        except ValueError:
            return str(p)
        return str(rel) if rel.parts else "."
    return str(p)


def tlpipe_command() -> str:
    """How this shell reaches this install of tlpipe: `tlpipe` when that is on the PATH (an
    activated venv, an installed package), else this environment's script (`.venv/bin/tlpipe`
    after `make demo`), else `python -m cli.app`."""
    script = Path(sys.prefix) / "bin" / "tlpipe"
    found = shutil.which("tlpipe")
    if found and (not script.exists() or os.path.samefile(found, script)):
        return "tlpipe"
    if script.exists():
        shown = _shown(script)
        return shlex.quote(shown if "/" in shown else f"./{shown}")
    return f"{shlex.quote(sys.executable)} -m cli.app"


def _opener() -> str | None:
    if sys.platform == "darwin":
        return "open"
    return "xdg-open" if shutil.which("xdg-open") else None


def next_commands(model: str, root: str | os.PathLike, *, image: str | os.PathLike | None = None,
                  report: str | os.PathLike | None = None, champion: str | None = None,
                  challenger: str | None = None) -> list[tuple[str, str]]:
    """[(command, what it does)] after a run that registered `model` (version `challenger`,
    `champion` the version @champion points at, None when there is none). A command is "" when
    there is nothing to run (the report where no program opens files)."""
    t, q = tlpipe_command(), shlex.quote
    r = f" --root {q(_shown(root))}"
    out: list[tuple[str, str]] = []
    if challenger and champion != challenger:
        out.append((f"{t} promote {q(model)}{r}",
                    "moves @champion to the challenger if it beats the champion"
                    if champion else "makes the challenger @champion (there is none yet)"))
    out.append((f"{t} serve --model {q(model + '@champion')}{r}",
                "serve the champion: http://127.0.0.1:8000/v1/predict, OpenAPI at /docs"))
    if image:
        out.append((f"{t} predict {q(_shown(image))} --model {q(model + '@challenger')}{r}",
                    "classify a test image in process"))
    out.append((f"{t} ui{r}", "MLflow UI on http://127.0.0.1:5000"))
    if report:
        opener = _opener()
        out.append((f"{opener} {q(_shown(report))}", "the sweep's report") if opener else
                   ("", f"the sweep's report, to open in a browser: {_shown(report)}"))
    return out


def print_next_steps(console, model: str, root: str | os.PathLike, **kw) -> list[tuple[str, str]]:
    """Print `next_commands` on `console` (a rich Console) as a shell snippet: a `# what` comment
    line above each command, every line unwrapped, so the block can be pasted as printed;
    returns them."""
    from rich.text import Text

    cmds = next_commands(model, root, **kw)

    def line(text: str, style: str | None = None) -> None:
        console.print(Text("  " + text, style=style or ""), soft_wrap=True, highlight=False)

    console.print(Text("next:", style="bold"))
    if tlpipe_command() != "tlpipe" and (Path(sys.prefix) / "bin" / "activate").exists():
        activate = _shown(Path(sys.prefix) / "bin" / "activate")
        line(f"# tlpipe is not on this shell's PATH: `source {activate}` puts it there", "dim")
    for cmd, why in cmds:
        line(f"# {why}", "dim")
        if cmd:
            line(cmd)
    return cmds


def example_image(dataset) -> str | None:
    """A real image of the dataset's test split (else any split), for the `predict` example."""
    for split in ("test", "val", "train"):
        records = dataset.split(split)
        if records:
            return str(records[0].path)
    return None


#: below this share of classifier answers on held-out images, `tlpipe run` says so
LOW_COVERAGE = 0.5


def threshold_lines(calibration: dict | None) -> list[str]:
    """What the registered thresholds do, in one line (plus a warning when the classifier would
    answer few images at the target precision: tiny or hard sets)."""
    if not calibration:
        return []
    target = float(calibration.get("target_precision", 0.0))
    oof = calibration.get("oof_coverage")
    test = calibration.get("test") or {}
    pct = lambda v: "n/a" if v is None else f"{100 * float(v):.0f} %"  # noqa: E731
    lines = [f"thresholds: the classifier answers {pct(oof)} of held-out images at the "
             f"{pct(target)} precision target (out of fold); on the test split it answered "
             f"{pct(test.get('classifier_rate'))} at {pct(test.get('classifier_precision'))} "
             f"precision, abstained on {pct(test.get('abstain_rate'))}"]
    rates = [v for v in (oof, test.get("classifier_rate")) if v is not None]
    if rates and min(rates) < LOW_COVERAGE:
        lines.append(f"[yellow]warning:[/] at a {pct(target)} precision target the classifier "
                     f"answers only {pct(min(rates))} of images; the rest go to the k-NN fallback "
                     "or abstain. Label more images, or lower --target-precision if wrong answers "
                     "cost less than no answer.")
    return lines


def print_after_run(console, result, root: str | os.PathLike) -> list[tuple[str, str]]:
    """The next commands after `jobs.run.run` registered `result.version` (nothing when it did
    not): reads where @champion points now, so a run that promoted says serve, not promote."""
    if not result.version:
        return []
    from jobs.registry import alias_version
    from jobs.tracking import setup_mlflow
    from pipeline.settings import DEFAULT_EXPERIMENT

    setup_mlflow(Path(root), DEFAULT_EXPERIMENT)
    return print_next_steps(console, result.model_name, root, image=example_image(result.dataset),
                            report=result.sweep.report_path, challenger=str(result.version),
                            champion=alias_version(result.model_name, "champion"))
