"""What a sweep will train: feature sets (one per backbone), head configurations, and the
per-candidate parameters and skip reasons."""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

#: heads `tlpipe run` tries when none are named
DEFAULT_HEADS = ("linear", "knn", "centroid", "mlp")

#: heads that fine-tune the backbone (on Ray Train, `jobs.finetune`) instead of probing it
FINETUNE_HEADS = {"lora": "lora", "full": "full"}

#: short CLI names -> `pipeline.heads.HEADS` keys (the class names); either form is accepted
HEAD_ALIASES = {"linear": "LinearProbe", "knn": "KNN", "centroid": "NearestCentroid",
                "zeroshot": "ZeroShot", "zero-shot": "ZeroShot", "tip": "TipAdapter",
                "mlp": "MLP"}


@dataclass(frozen=True)
class FeatureSetRef:
    """One backbone's cached embeddings, as the sweep sees them.

    `fingerprint` keys the feature store (it depends on the extraction engine and dtype: take it
    from `ExtractStats.fingerprint` or `spec.fingerprint_for(engine, dtype)`). `spec` (a
    BackboneSpec) is needed only to measure the backbone's latency and for text-prompt heads.
    """

    backbone: str
    fingerprint: str
    family: str = ""
    params_m: float | None = None
    engine: str = "torch"
    text: bool = False
    spec: Any = None
    dtype: str = "float32"

    @classmethod
    def from_spec(cls, spec: Any, *, engine: str = "torch", dtype: str = "float32",
                  fingerprint: str | None = None) -> "FeatureSetRef":
        return cls(backbone=spec.name,
                   fingerprint=fingerprint or spec.fingerprint_for(engine, dtype),
                   family=spec.family, params_m=spec.params_m, engine=engine,
                   text=bool(getattr(spec, "text", False)), spec=spec, dtype=dtype)


@dataclass(frozen=True)
class HeadConfig:
    """A head to try: `head` is a key of `pipeline.heads.HEADS`; `name` labels the candidate
    (defaults to `head`; give two configs of one head different names to compare params)."""

    head: str
    params: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.head


#: heads submitted before the others of the feature sets in flight: the linear probes (the
#: concatenation starts from their choices), then the MLPs, the longest tasks
SUBMIT_FIRST = ("LinearProbe", "MLP")


def submit_rank(head: str) -> int:
    """Submission order of a head's task among those of the feature sets in flight (lower first)."""
    return SUBMIT_FIRST.index(head) if head in SUBMIT_FIRST else len(SUBMIT_FIRST)


def slug(text: str) -> str:
    """A name as one safe path component."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "x"


def candidate_name(backbone: str, head_label: str) -> str:
    return f"{backbone}+{head_label}"


def short_backbone(name: str) -> str:
    """'efficientnet/tf_efficientnet_lite0.in1k' -> 'tf_efficientnet_lite0.in1k'."""
    return name.rsplit("/", 1)[-1]


def short_backbones(names: Sequence[str]) -> list[str]:
    """Backbone names without their family and without the part every one of them shares
    ('tf_efficientnet_lite0.in1k', 'tf_efficientnet_lite1.in1k' -> 'lite0.in1k', 'lite1.in1k')."""
    shorts = [short_backbone(n) for n in names]
    if len(shorts) < 2:
        return shorts
    common = os.path.commonprefix(shorts)
    cut = common.rfind("_") + 1  # only whole name parts
    return [s[cut:] or s for s in shorts]


def resolve_head(name: str) -> str:
    """A head name or alias -> its key in `pipeline.heads.HEADS` (ValueError listing choices)."""
    from pipeline.heads import HEADS

    if name in HEADS:
        return name
    if name.lower() in HEAD_ALIASES:
        return HEAD_ALIASES[name.lower()]
    by_lower = {k.lower(): k for k in HEADS}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    raise ValueError(f"unknown head {name!r}; choose from {sorted(HEAD_ALIASES)} "
                     f"(or the class names {sorted(HEADS)})")


def head_configs(heads: Iterable[str | HeadConfig] | Mapping[str, Mapping[str, Any]],
                 head_params: Mapping[str, Mapping[str, Any]] | None) -> list[HeadConfig]:
    """HeadConfigs with resolved head keys and the per-label params merged in."""
    if isinstance(heads, Mapping):
        items: list[HeadConfig] = [HeadConfig(h, dict(p or {})) for h, p in heads.items()]
    elif isinstance(heads, str):
        items = [HeadConfig(heads)]
    else:
        items = [h if isinstance(h, HeadConfig) else HeadConfig(str(h)) for h in heads]
    out = []
    for hc in items:
        label = hc.label  # the name the user gave (e.g. "linear") labels the candidate
        extra = dict((head_params or {}).get(label, {}))
        out.append(HeadConfig(resolve_head(hc.head), {**dict(hc.params), **extra}, label))
    labels = [h.label for h in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"head labels must be unique, duplicated: {dup}; give repeated heads "
                         "different HeadConfig names")
    if not out:
        raise ValueError("no heads to sweep: pass at least one head name")
    return out


def init_params(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


class BackboneTextEmbedder:
    """Picklable ``list[str] -> (N, D)`` callable: loads the backbone's text tower lazily (in the
    Ray worker that needs it) — for heads with a ``text_embedder`` parameter (zero-shot)."""

    def __init__(self, spec: Any, device: str = "cpu"):
        self.spec = spec
        self.device = device
        self._backbone = None

    def __repr__(self) -> str:
        return f"BackboneTextEmbedder({getattr(self.spec, 'name', self.spec)!r})"

    def __getstate__(self):
        return {"spec": self.spec, "device": self.device, "_backbone": None}

    def __call__(self, prompts: Sequence[str]) -> Any:  # (N, D) numpy array
        if self._backbone is None:
            from pipeline.backbones import load_backbone

            self._backbone = load_backbone(self.spec, device=self.device, engine="torch")
        return self._backbone.text_embed(list(prompts))


def skip_reason(hc: HeadConfig, ref: FeatureSetRef, text_embedders: Mapping[str, Any]) -> str | None:
    """Why this head cannot run on this feature set (None when it can)."""
    from pipeline.heads import HEADS

    params = init_params(HEADS[hc.head])
    if "text_embedder" in params and hc.params.get("text_embedder") is None:
        if ref.backbone in text_embedders:
            return None
        if not ref.text:
            return (f"head {hc.head!r} needs class-name text embeddings, but {ref.backbone} has no "
                    "text tower (use a CLIP-family backbone)")
        if ref.spec is None:
            return (f"head {hc.head!r} needs the text tower of {ref.backbone}, but no backbone "
                    "spec was given to load it (pass FeatureSetRef.from_spec(spec))")
    return None


def expected_candidates(refs: Sequence[FeatureSetRef], head_cfgs: Sequence[HeadConfig],
                        ft_cfgs: Sequence[HeadConfig], text_embedders: Mapping[str, Any], *,
                        ensembles: bool) -> int:
    """How many candidates a sweep will make at most: probes that can run, the linear probe on the
    concatenated backbones, the ensemble, the fine-tunes (for progress reports)."""
    probes = sum(skip_reason(h, ref, text_embedders) is None for ref in refs for h in head_cfgs)
    concat = ensembles and len(refs) >= 2 and any(h.head == "LinearProbe" for h in head_cfgs)
    return probes + int(concat) + int(bool(ensembles)) + len(refs) * len(ft_cfgs)


def text_embedder_for(ref: FeatureSetRef, text_embedders: Mapping[str, Any]) -> Any:
    return text_embedders.get(ref.backbone) or BackboneTextEmbedder(ref.spec)


#: a Tip-Adapter config's key for the prompt templates of its zero-shot base (from `--set
#: zeroshot.templates=...`); not a TipAdapter parameter, `task_params` takes it out
BASE_TEMPLATES = "base_templates"


def task_params(hc: HeadConfig, ref: FeatureSetRef, text_embedders: Mapping[str, Any],
                cpus: int) -> dict[str, Any]:
    """The head's constructor parameters for one candidate task."""
    from pipeline.heads import HEADS

    params = dict(hc.params)
    templates = params.pop(BASE_TEMPLATES, None)
    names = init_params(HEADS[hc.head])
    if "text_embedder" in names and params.get("text_embedder") is None:
        params["text_embedder"] = text_embedder_for(ref, text_embedders)
    if hc.head == "TipAdapter" and params.get("base") is None and \
            (ref.backbone in text_embedders or (ref.text and ref.spec is not None)):
        # CLIP-family: Tip-Adapter on top of zero-shot (training-free end to end)
        params["base"] = HEADS["ZeroShot"](text_embedder=text_embedder_for(ref, text_embedders),
                                           templates=templates)
    if "n_threads" in names and params.get("n_threads") is None:
        params["n_threads"] = max(1, int(cpus))
    return params


def loggable_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Params with callables and estimators shown by their repr (MLflow params are text)."""
    out = {}
    for k, v in params.items():
        if callable(v) or hasattr(v, "get_params"):
            v = repr(v)
        out[k] = v
    return out


def sweep_inputs(feature_sets: Sequence[Any], heads: Any,
                 head_params: Mapping[str, Mapping[str, Any]] | None, *, selection_metric: str,
                 tolerance: float) -> tuple[list[HeadConfig], list[HeadConfig], list[FeatureSetRef]]:
    """(probe head configs, fine-tune head configs, feature sets), checked before any work:
    unknown heads or metrics, a bad tolerance, no or duplicated backbones fail with the fix."""
    from pipeline.evaluate import SELECTION_METRICS

    if selection_metric not in SELECTION_METRICS:
        raise ValueError(f"unknown selection metric {selection_metric!r}; choose one of "
                         f"{SELECTION_METRICS}")
    if not 0.0 <= float(tolerance) < 1.0:
        raise ValueError(f"tolerance must be in [0, 1) (0.005 = half a point), got {tolerance}")
    head_cfgs, ft_cfgs = resolve_heads(heads, head_params)
    zero_shot = next((h for h in head_cfgs if h.head == "ZeroShot" and "templates" in h.params), None)
    if zero_shot is not None:  # Tip-Adapter's zero-shot base prompts as the zero-shot head does
        head_cfgs = [HeadConfig(h.head, {**h.params, BASE_TEMPLATES: zero_shot.params["templates"]},
                                h.name) if h.head == "TipAdapter" and h.params.get("base") is None
                     else h for h in head_cfgs]
    refs = [f if isinstance(f, FeatureSetRef) else FeatureSetRef.from_spec(f) for f in feature_sets]
    if not refs:
        raise ValueError("no feature sets to sweep: extract at least one backbone first")
    names = [r.backbone for r in refs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"each backbone may appear once per sweep; duplicated: {dup}")
    return head_cfgs, ft_cfgs, refs


def resolve_heads(heads: Any, head_params: Mapping[str, Mapping[str, Any]] | None
                  ) -> tuple[list[HeadConfig], list[HeadConfig]]:
    """(probe head configs, fine-tune head configs) of a sweep's `heads`: an unknown head name (or
    none at all) fails with the choices (ValueError)."""
    probes, ft_cfgs = split_finetune_heads(heads, head_params)
    return (head_configs(probes, head_params) if probes or not ft_cfgs else []), ft_cfgs


def split_finetune_heads(heads: Any, head_params: Mapping[str, Mapping[str, Any]] | None
                         ) -> tuple[list[HeadConfig], list[HeadConfig]]:
    """(probe heads as given, [HeadConfig for each fine-tune head]) from a sweep's `heads`."""
    if isinstance(heads, Mapping):
        items = [HeadConfig(h, dict(p or {})) for h, p in heads.items()]
    elif isinstance(heads, str):
        items = [HeadConfig(heads)]
    else:
        items = [h if isinstance(h, HeadConfig) else HeadConfig(str(h)) for h in heads]
    probes, ft = [], []
    for hc in items:
        key = str(hc.head).lower()
        if key in FINETUNE_HEADS:
            label = hc.label
            params = {**dict(hc.params), **dict((head_params or {}).get(label, {}))}
            ft.append(HeadConfig(FINETUNE_HEADS[key], params, label))
        else:
            probes.append(hc)
    return probes, ft
