"""The README's quick start (the block between `<!-- quickstart -->` markers) is run as documented,
in a fresh login shell with a clean environment, so the instructions cannot drift from the code.

Cheap lines run as written (`source .venv/bin/activate`, `... --help`, `tlpipe backbones list`;
`uv run` only where the shell finds uv). Lines that would start work or a server (`serve`,
`predict`, `ui`) are not run: the options they use must be ones `tlpipe COMMAND --help` lists.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = (("tlpipe",), (".venv/bin/tlpipe",), ("uv", "run", "--frozen", "tlpipe"))


def quickstart_lines() -> list[str]:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- quickstart\b[^>]*-->\s*```bash\n(.*?)```\s*<!-- /quickstart -->", text, re.S)
    assert m, "README.md has no ```bash block between <!-- quickstart --> and <!-- /quickstart -->"
    lines = [shlex.split(line, comments=True) for line in m.group(1).splitlines()]
    return [shlex.join(words) for words in lines if words]


def split_launcher(words: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    for launcher in LAUNCHERS:
        if tuple(words[:len(launcher)]) == launcher:
            return launcher, words[len(launcher):]
    return None


def fresh_shell(script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`bash -lc script` in the repository with only what a new login has: HOME, a system PATH
    (the login profile adds the user's own), a UTF-8 locale and a wide terminal for --help."""
    env = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/local/bin:/usr/bin:/bin",
           "LANG": "C.UTF-8", "COLUMNS": "200", "TERM": "dumb"}
    return subprocess.run(["bash", "-lc", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def venv_ready():
    if not (REPO / ".venv" / "bin" / "tlpipe").exists():
        pytest.skip(".venv/bin/tlpipe is missing: run `make venv` (or `make demo`) first")


def test_quickstart_block_documents_the_three_ways_to_reach_tlpipe():
    lines = quickstart_lines()
    assert "source .venv/bin/activate" in lines
    assert any(line.startswith(".venv/bin/tlpipe ") for line in lines)
    assert any(line.startswith("uv run") and " tlpipe " in line for line in lines)
    # every line is the activation or a tlpipe command (so the test below checks all of them)
    for line in lines:
        assert line == "source .venv/bin/activate" or split_launcher(shlex.split(line)), line


def test_quickstart_commands_run_in_a_fresh_shell(venv_ready):
    has_uv = fresh_shell("command -v uv").returncode == 0
    script, ran, checked = ["set -euo pipefail"], [], []
    for line in quickstart_lines():
        words = shlex.split(line)
        if line == "source .venv/bin/activate":
            script.append(line)
            continue
        launcher, args = split_launcher(words)
        if launcher[0] == "uv" and not has_uv:
            continue
        if args[-1:] == ["--help"] or args == ["backbones", "list"]:
            script += [f"echo '>>> {line}'", line]
            ran.append(line)
        else:  # would start work or a server: its options must exist
            command = [a for a in args if not a.startswith("-")][:1]
            script += [f"echo '>>> {line}'", shlex.join([*launcher, *command, "--help"])]
            checked.append((line, [a.split("=")[0] for a in args if a.startswith("--")]))
    proc = fresh_shell("\n".join(script))
    assert proc.returncode == 0, f"README quick start failed in a fresh shell:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    sections = dict(re.findall(r"^>>> ([^\n]*)\n(.*?)(?=^>>> |\Z)", proc.stdout, re.S | re.M))
    assert set(sections) == set(ran) | {line for line, _ in checked}
    for line in ran:
        assert sections[line].strip(), f"{line!r} printed nothing"
    assert "efficientnet/tf_efficientnet_lite0.in1k" in sections["tlpipe backbones list"]
    for line, options in checked:
        for opt in options:
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", sections[line]), \
                f"README runs `{line}`, but `{opt}` is not an option of that command"
