"""The operations runbook (docs/operations.md) as tests run it: its ``sh`` blocks, found by a string they
contain, run as an operator would (bash, the venv's ``cls-worker`` on PATH)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from testkit.local import REPO

RUNBOOK = REPO / "docs" / "operations.md"

_SH_BLOCK = re.compile(r"^([ \t]*)```sh[ \t]*\n(.*?)^\1```[ \t]*$", re.MULTILINE | re.DOTALL)
VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
"""A shell variable reference in a block (``$X`` or ``${X}``)."""


def runbook_blocks(path: Path = RUNBOOK) -> list[str]:
    """The ``sh`` blocks of the runbook, in order (dedented when inside a list item)."""
    text = path.read_text(encoding="utf-8")
    return [textwrap.dedent(m.group(2)).strip() for m in _SH_BLOCK.finditer(text)]


def runbook_block(containing: str, path: Path = RUNBOOK) -> str:
    """The one runbook block containing ``containing`` (other tests run single blocks this way)."""
    matches = [b for b in runbook_blocks(path) if containing in b]
    assert len(matches) == 1, f"{len(matches)} runbook blocks contain {containing!r}"
    return matches[0]


def run_block(block: str, env: dict[str, str], cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """One block as an operator runs it: bash, the venv's ``cls-worker`` on PATH, repo-relative paths."""
    full_env = {**os.environ, **env}
    full_env.setdefault("JAVA_TOOL_OPTIONS", "-XX:TieredStopAtLevel=1")  # short-lived tools: half the CPU to start
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
