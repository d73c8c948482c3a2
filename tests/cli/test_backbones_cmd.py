"""`tlpipe backbones show | add | list | remove` on weights folders written by the libraries
(a tiny timm ViT saved with `save_for_hf`), and every command a missing-weights message names
exists with the options it names."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_models  # noqa: E402


@pytest.fixture
def runner(monkeypatch, tmp_path):
    from pipeline.backbones.named import use_state_root

    monkeypatch.delenv("TLPIPE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    yield CliRunner()
    use_state_root(None)


def _one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text, text
    return text


def test_show_add_list_remove_a_folder(runner, tmp_path):
    folder = tmp_path / "vit-tiny"
    tiny_models.save_timm(folder)
    res = runner.invoke(app, ["backbones", "show", str(folder)])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output)
    assert shown["source"] == "timm" and shown["arch"] == "vit_tiny_patch16_224" and shown["input_size"] == 32
    assert shown["weights_available"] is True and re.fullmatch(r"[0-9a-f]{64}", shown["fingerprint"])

    res = runner.invoke(app, ["backbones", "add", "vt", str(folder), "--family", "mine", "--root", "st"])
    assert res.exit_code == 0, res.output
    assert "registered mine/vt" in " ".join(res.output.split())
    assert (tmp_path / "st" / "backbones.json").is_file()
    res = runner.invoke(app, ["backbones", "list", "--json", "--root", "st"])
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert rows["mine/vt"]["registered"] == str(folder) and rows["mine/vt"]["available"]
    assert "efficientnet/tf_efficientnet_lite0.in1k" in rows  # shown with the built-in ones
    from jobs.run import default_backbones
    from pipeline.backbones.named import use_state_root

    use_state_root("st")
    assert "mine/vt" in default_backbones()[0]  # `tlpipe run` without --backbones tries it too
    res = runner.invoke(app, ["backbones", "show", "vt", "--root", "st"])
    assert json.loads(res.output)["fingerprint"] == shown["fingerprint"]  # same files, same key
    assert "already registered" in _one_line_error(runner.invoke(app, ["backbones", "add", "vt", str(folder), "--root", "st"]))
    assert "built-in" in _one_line_error(runner.invoke(
        app, ["backbones", "add", "efficientnet/tf_efficientnet_lite0.in1k", str(folder), "--root", "st"]))
    res = runner.invoke(app, ["backbones", "remove", "vt", "--root", "st"])
    assert res.exit_code == 0 and "removed mine/vt" in res.output
    assert "no backbone registered as 'vt'" in _one_line_error(runner.invoke(app, ["backbones", "remove", "vt", "--root", "st"]))
    assert "unknown backbone 'vt'" in _one_line_error(runner.invoke(app, ["backbones", "show", "vt", "--root", "st"]))


def test_bare_checkpoint_needs_its_model_name_and_set_gives_it(runner, tmp_path):
    folder = tmp_path / "bare"
    tiny_models.save_timm(folder)
    (folder / "config.json").unlink()  # just the weights
    err = _one_line_error(runner.invoke(app, ["backbones", "show", str(folder)]))
    assert "matches no backbone format: found model.safetensors" in err and "--set arch=" in err
    res = runner.invoke(app, ["backbones", "show", str(folder), "--set", "arch=vit_tiny_patch16_224",
                              "--set", "input_size=32"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["source"] == "timm" and json.loads(res.output)["input_size"] == 32
    err = _one_line_error(runner.invoke(app, ["backbones", "show", str(tmp_path / "nowhere")]))
    assert "does not exist on this machine" in err


def test_missing_weights_messages_name_commands_that_exist(runner):
    from pipeline.backbones import weights_available

    ok, why = weights_available("dinov2/vit_small_patch14.lvd142m")
    if ok:
        pytest.skip("DINOv2 weights are cached on this machine")
    commands = re.findall(r"`(tlpipe [^`]+)`|`(--backbones [A-Z]+)`", why)
    named = [a or f"tlpipe run DATA {b}" for a, b in commands]
    assert "tlpipe backbones add NAME DIR" in named and "tlpipe run DATA --backbones DIR" in named
    for command in named:
        words = command.split()[1:]
        sub = [w for w in words if w.islower() and not w.startswith("-")][:2 if words[0] == "backbones" else 1]
        res = runner.invoke(app, [*sub, "--help"])
        assert res.exit_code == 0, (command, res.output)
        for opt in (w for w in words if w.startswith("--")):
            assert opt in res.output, f"{command!r}: {opt} is not an option of `tlpipe {' '.join(sub)}`"
