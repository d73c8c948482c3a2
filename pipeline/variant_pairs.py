"""What a precision or size variant costs in accuracy: each variant candidate against the same
head on its reference backbone, paired on the same selection images.

The reference of ``NAME@160-int8`` is ``NAME@160`` (the fp32 graph it was quantized from); of
``NAME@int8`` it is ``NAME``; of an fp32 size variant ``NAME@160`` it is ``NAME`` at its own size.
The difference (variant - reference) is bootstrapped pairwise (`pipeline.paired`), the way
selection compares candidates, and set beside both candidates' measured latency. Pure: it reads
the leaderboard rows and the out-of-fold predictions the selector reads
(`pipeline.sweep.outcome.paired_inputs`), and writes nothing.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from pipeline.backbones.spec import VARIANT_SEP, split_variant
from pipeline.backbones.variants import variant_name
from pipeline.paired import metric_from_labels, paired_bootstrap

__all__ = ["pair_notes", "reference_backbone", "variant_pairs"]


def reference_backbone(backbone: str) -> str | None:
    """The backbone a variant is compared with (None for a plain backbone or a concatenation)."""
    if "+" in backbone or VARIANT_SEP not in backbone:
        return None
    base, size, precision = split_variant(backbone)
    if precision and precision != "fp32":
        return variant_name(base, size=size)
    return base


def variant_pairs(rows: Sequence[Mapping[str, Any]], y_true: Mapping[str, str],
                  predictions: Mapping[str, Mapping[str, str]], *, metric: str = "balanced_accuracy",
                  latency_key: str = "latency_ms_b1", n_bootstrap: int = 2000, confidence: float = 0.95,
                  seed: int = 0) -> list[dict[str, Any]]:
    """One row per finished variant candidate whose reference (same head) finished too:
    ``{candidate, reference, backbone, reference_backbone, head, metric, n, score, reference_score,
    diff, low, high, latency_ms, reference_latency_ms, speedup}`` (diff = variant - reference, in
    metric units, on the images both were scored on; speedup = reference latency / variant's)."""
    by_key = {(r.get("backbone"), r.get("head")): r for r in rows if r.get("name") in predictions}
    out: list[dict[str, Any]] = []
    for (backbone, head), row in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        ref_backbone = reference_backbone(str(backbone))
        ref = by_key.get((ref_backbone, head)) if ref_backbone else None
        if ref is None:
            continue
        pa, pb = predictions[row["name"]], predictions[ref["name"]]
        ids = sorted(set(pa) & set(pb) & set(y_true))
        if not ids:
            continue
        y = [y_true[i] for i in ids]
        pd = paired_bootstrap(metric, y, [pa[i] for i in ids], [pb[i] for i in ids],
                              n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)
        lat, ref_lat = row.get(latency_key), ref.get(latency_key)
        out.append({
            "candidate": row["name"], "reference": ref["name"], "backbone": backbone,
            "reference_backbone": ref_backbone, "head": head, "metric": metric, "n": len(ids),
            "score": metric_from_labels(metric, y, [pa[i] for i in ids]),
            "reference_score": metric_from_labels(metric, y, [pb[i] for i in ids]),
            "diff": pd.diff, "low": pd.low, "high": pd.high,
            "latency_ms": lat, "reference_latency_ms": ref_lat,
            "speedup": (float(ref_lat) / float(lat)) if lat and ref_lat else None,
        })
    return out


def pair_notes(pairs: Sequence[Mapping[str, Any]]) -> list[str]:
    """One report line per `variant_pairs` row."""
    out = []
    for p in pairs:
        speed = f", {p['speedup']:.2f}x the speed" if p.get("speedup") else ""
        out.append(f"Variant {p['candidate']} vs {p['reference']}: {p['metric']} "
                   f"{100 * p['diff']:+.2f} points [{100 * p['low']:+.2f}, {100 * p['high']:+.2f}] "
                   f"paired on {p['n']} selection images{speed}.")
    return out
