"""What `tlpipe serve` checks before it deploys anything, and how a replica's failure is told.

`check_models` resolves every model reference exactly as a replica will (same tracking URI, same
download cache), downloads each predictor once into that cache (replicas then reuse it) and opens
it: a wrong name, a missing alias, an unreachable tracking server or an artifact that is not a
predictor is one `ModelSourceError` in the driver, within seconds, before Ray starts.

`replica_failure` turns Serve's "Failed to update the deployments [...]" into the cause the
replica raised, read from the application's status (Serve keeps it there, not in the exception).
"""

from __future__ import annotations

from typing import Any, Sequence

from deploy.backbone import backbone_identity, spec_key
from deploy.model_source import ModelSource, ModelSourceError, ResolvedModel
from deploy.settings import ServeSettings


class ServeStartError(RuntimeError):
    """The application did not start; the message is the cause a replica reported."""


def check_models(models: Sequence[str], *, tracking_uri: str | None = None, state_root: str | None = None,
                 engine: str | None = None) -> list[tuple[ResolvedModel, list[str]]]:
    """`open_model` for every model: (resolved, its backbone spec keys) each. Every failing
    reference is named in ONE `ModelSourceError` (joined by '; '), not only the first."""
    out, problems = [], []
    for model in models:
        try:
            resolved, predictor = open_model(model, tracking_uri=tracking_uri, state_root=state_root, engine=engine)
        except ModelSourceError as exc:
            problems.append(str(exc) if len(models) == 1 else f"{model}: {exc}")
            continue
        out.append((resolved, [spec_key(s) for s in getattr(predictor, "specs", None) or [predictor.spec]]))
    if problems:
        raise ModelSourceError("; ".join(" ".join(p.split()) for p in problems))
    return out


def distinct_backbones(checked: Sequence[tuple[ResolvedModel, list[str]]]) -> list[str]:
    """A spec key per distinct backbone (fingerprint, `backbone_identity`) of `check_models`'
    answer, in order of first use: one backbone deployment each (models on it share it)."""
    keys: dict[str, str] = {}
    for _, model_keys in checked:
        for k in model_keys:
            keys.setdefault(backbone_identity(k), k)
    return list(keys.values())


def open_model(model: str, *, tracking_uri: str | None = None, state_root: str | None = None,
               engine: str | None = None):
    """(resolved, Predictor) of `model`, opened as a replica would; raises `ModelSourceError`."""
    overrides: dict[str, Any] = {k: v for k, v in {"tracking_uri": tracking_uri, "state_root": state_root,
                                                  "engine": engine}.items() if v is not None}
    settings = ServeSettings(model=model, **overrides)
    try:
        source = ModelSource.for_settings(settings)
    except ValueError as exc:
        raise ModelSourceError(str(exc)) from None
    resolved = source.resolve()
    try:
        predictor = source.load(resolved, engine=settings.engine)
    except (ModelSourceError, OSError):
        raise
    except Exception as exc:  # an artifact this tlpipe cannot read: say which and why
        raise ModelSourceError(f"{resolved.label} ({resolved.source}) cannot be loaded: "
                               f"{type(exc).__name__}: {exc}") from None
    return resolved, predictor


def replica_failure(app_name: str) -> str | None:
    """The last line of the error a deployment of `app_name` reported (None if none did)."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # the controller is gone too: nothing more precise to say
        return None
    if app is None:
        return None
    messages = [d.message for d in app.deployments.values() if getattr(d, "message", "")]
    messages.append(getattr(app, "message", "") or "")
    for message in messages:
        cause = last_error_line(message)
        if cause:
            return cause
    return None


def last_error_line(message: str) -> str | None:
    """'pkg.mod.SomeError: what went wrong' -> 'what went wrong (SomeError)'; the last
    exception line of a traceback text (Ray's ``RayTaskError(X): X: ...`` unwrapped), None when
    there is none."""
    lines = [ln.strip() for ln in str(message or "").splitlines() if ln.strip()]
    for line in reversed(lines):
        name, rest = _exception_name(line)
        if name is None:
            continue
        while True:  # "RayTaskError(E): pkg.E: text" -> "text"
            inner, inner_rest = _exception_name(rest)
            if inner is None:
                break
            name, rest = inner, inner_rest
        return f"{rest} ({name})"
    return None


def _exception_name(line: str) -> tuple[str | None, str]:
    head, sep, rest = line.partition(": ")
    if not sep or " " in head:
        return None, line
    name = head.rsplit(".", 1)[-1]
    if name.endswith(")") and "(" in name:  # Ray's RayTaskError(ModelSourceError)
        name = name[name.index("(") + 1:-1].rsplit(".", 1)[-1]
    if name.endswith(("Error", "Exception")):
        return name, rest
    return None, line
