"""Where the served predictor comes from: a registry alias, a pinned version, or a local directory.

Accepted references (`parse_model_ref`):

* ``NAME@alias`` / ``models:/NAME@alias`` — follows an MLflow registered-model alias (polled);
* ``NAME/3`` / ``models:/NAME/3`` — one pinned version;
* a directory holding a saved predictor (``predictor.json``), or a downloaded MLflow model dir
  (``<dir>/artifacts/predictor/predictor.json``) — followed by the content hash of its
  ``predictor.json``, so re-saving the directory counts as a new version.

Registry versions are downloaded once into ``<cache_dir>/<version>/`` (atomically: a temporary
directory renamed into place) and reused after restarts.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

PREDICTOR_ARTIFACT = "predictor"  # the artifact key jobs/registry.py logs the predictor under
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class ModelSourceError(RuntimeError):
    """The reference cannot be resolved or loaded; the message says why and what to do."""


@dataclass(frozen=True)
class ModelRef:
    kind: str  # "alias" | "version" | "path"
    name: str
    alias: str | None = None
    version: str | None = None
    path: str | None = None

    def __str__(self) -> str:
        if self.kind == "alias":
            return f"{self.name}@{self.alias}"
        if self.kind == "version":
            return f"{self.name}/{self.version}"
        return str(self.path)

    @property
    def key(self) -> str:
        """Directory-safe name of the served model (the registered name, or the dir's name)."""
        return re.sub(r"[^A-Za-z0-9_.\-]+", "_", self.name).strip("._") or "model"


@dataclass(frozen=True)
class ResolvedModel:
    ref: ModelRef
    name: str
    version: str
    source: str

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


def _predictor_dir(path: Path) -> Path | None:
    for cand in (path, path / "artifacts" / PREDICTOR_ARTIFACT, path / PREDICTOR_ARTIFACT):
        if (cand / "predictor.json").is_file():
            return cand
    return None


def parse_model_ref(text: str) -> ModelRef:
    """Parse a model reference (see the module docstring). Raises ValueError naming the forms."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("no model given: pass NAME@alias (e.g. clothing-small@champion), NAME/VERSION, "
                         "or a saved predictor directory")
    raw = text.strip()
    looks_like_path = raw.startswith(("/", "./", "../", "~", "file:"))
    local = Path(raw[5:] if raw.startswith("file:") else raw).expanduser()
    if looks_like_path or (local.is_dir() and not raw.startswith("models:/")):
        if _predictor_dir(local) is None:
            raise ValueError(f"{local} holds no saved predictor (predictor.json, or "
                             f"artifacts/{PREDICTOR_ARTIFACT}/predictor.json); save one with Predictor.save(dir)")
        local = local.resolve()
        return ModelRef("path", name=local.name, path=str(local))
    body = raw[len("models:/"):] if raw.startswith("models:/") else raw
    if "@" in body:
        name, _, alias = body.partition("@")
        if _NAME_RE.match(name) and re.match(r"^[A-Za-z0-9_\-]+$", alias):
            return ModelRef("alias", name=name, alias=alias)
    elif "/" in body:
        name, _, version = body.rpartition("/")
        if _NAME_RE.match(name) and version.isdigit():
            return ModelRef("version", name=name, version=str(int(version)))
    raise ValueError(f"cannot parse model reference {text!r}: use NAME@alias (e.g. clothing-small@champion), "
                     "NAME/VERSION (e.g. clothing-small/3), models:/NAME@alias, or a saved predictor directory")


class ModelSource:
    """Resolve a `ModelRef` to a concrete version and fetch its predictor directory.

    MLflow is used through an explicit `MlflowClient(tracking_uri, registry_uri)`; no global MLflow
    state is touched. MLflow is imported only for registry references.
    """

    def __init__(self, ref: ModelRef | str, *, tracking_uri: str | None, cache_dir: str | os.PathLike):
        self.ref = parse_model_ref(ref) if isinstance(ref, str) else ref
        self.tracking_uri = tracking_uri
        self.cache_dir = Path(cache_dir)
        self._client = None

    @classmethod
    def for_settings(cls, settings) -> "ModelSource":
        """The source a serving replica with these `ServeSettings` reads: its model reference,
        tracking URI and download cache (``<state_root>/serve/<model>/versions``)."""
        ref = parse_model_ref(settings.model)
        return cls(ref, tracking_uri=settings.resolved_tracking_uri,
                   cache_dir=settings.serve_dir(ref.key) / "versions")

    # ------------------------------------------------------------------ registry
    @property
    def client(self):
        if self._client is None:
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def resolve(self) -> ResolvedModel:
        """The version the reference points at now (one registry call for aliases)."""
        ref = self.ref
        if ref.kind == "path":
            d = _predictor_dir(Path(ref.path))
            if d is None:
                raise ModelSourceError(f"{ref.path} no longer holds a saved predictor (predictor.json)")
            digest = hashlib.sha256((d / "predictor.json").read_bytes()).hexdigest()[:12]
            return ResolvedModel(ref, ref.name, f"local-{digest}", str(d))
        from mlflow.exceptions import MlflowException

        from jobs.mlflow_setup import TrackingServerError, check_tracking_server

        uri = str(self.tracking_uri or "")
        try:  # a server that is down: one line now, not MLflow's minutes of retries
            check_tracking_server(uri)
        except TrackingServerError as exc:
            raise ModelSourceError(f"cannot resolve {ref}: {exc}") from None
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            raise ModelSourceError(f"no MLflow store at {uri[len('sqlite:///'):]}: nothing was registered "
                                   f"under this state root; run `tlpipe run` first, or point --root / "
                                   f"MLFLOW_TRACKING_URI at the store that holds {ref.name}")
        try:
            if ref.kind == "alias":
                mv = self.client.get_model_version_by_alias(ref.name, ref.alias)
            else:
                mv = self.client.get_model_version(ref.name, ref.version)
        except MlflowException as exc:
            why = str(getattr(exc, "message", exc)).strip().rstrip(".")
            raise ModelSourceError(
                f"cannot resolve {ref} in the registry at {self.tracking_uri}: {why}. "
                + (self._what_exists(ref.name) or
                   "Register a model with `tlpipe run`, or check --root / MLFLOW_TRACKING_URI "
                   "(`tlpipe compare` lists what is registered)")) from None
        return ResolvedModel(ref, ref.name, str(mv.version), f"models:/{ref.name}/{mv.version}")

    def _what_exists(self, name: str) -> str | None:
        """'NAME has versions 1, 2; aliases: challenger -> 2. …' (None when NAME is not registered)."""
        try:
            rm = self.client.get_registered_model(name)
            versions = sorted(int(v.version) for v in self.client.search_model_versions(f"name='{name}'"))
        except Exception:  # not registered (or the store is unreachable): nothing to list
            return None
        aliases = ", ".join(f"{a} -> {v}" for a, v in sorted((rm.aliases or {}).items())) or "none"
        return (f"{name} has versions {', '.join(map(str, versions)) or 'none'}; aliases: {aliases}. "
                f"Serve one of those (e.g. {name}/{versions[-1] if versions else 1}), or make the "
                f"challenger the champion with `tlpipe promote {name}`")

    def fetch(self, resolved: ResolvedModel) -> Path:
        """The local directory of the resolved version's saved predictor (downloaded once)."""
        if resolved.ref.kind == "path":
            return Path(resolved.source)
        dest = self.cache_dir / resolved.version
        if (dest / ".complete").is_file():
            found = _predictor_dir(dest / (dest / ".complete").read_text().strip())
            if found is not None:
                return found
        import mlflow

        uri = self.client.get_model_version_download_uri(resolved.name, resolved.version)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{resolved.version}.", dir=self.cache_dir))
        try:
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(tmp), tracking_uri=self.tracking_uri))
            root = _predictor_dir(local)
            if root is None:
                raise ModelSourceError(
                    f"{resolved.source} ({uri}) has no '{PREDICTOR_ARTIFACT}' artifact with a predictor.json; "
                    "register predictors with jobs.registry.register_predictor")
            (tmp / ".complete").write_text(str(root.relative_to(tmp)))
            try:
                os.replace(tmp, dest)
            except OSError:  # another replica finished the same download first: use theirs
                if not (dest / ".complete").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        found = _predictor_dir(dest / (dest / ".complete").read_text()) or _predictor_dir(dest)
        if found is None:  # pragma: no cover - checked before the rename
            raise ModelSourceError(f"{dest}: downloaded model lost its predictor directory")
        return found

    def load(self, resolved: ResolvedModel, *, engine: str = "auto"):
        """The resolved version's predictor: a single-label `pipeline.predictor.Predictor` or a
        `pipeline.multilabel.predictor.MultiLabelPredictor`, by what its predictor.json says."""
        from pipeline.multilabel.predictor import load_any_predictor

        return load_any_predictor(self.fetch(resolved), engine=engine)
