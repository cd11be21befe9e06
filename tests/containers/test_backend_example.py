"""docs/client.md's "Backend integration tests" example, as written, run by pytest in a fresh venv that has only
the light distribution (``cls-workers[testkit]``) and a test runner, against the local images (``make images``).
The venv's size and install time are measured by tests/unit/test_light_distribution.py (same session venv)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from testkit.pictures import photo_jpeg

pytestmark = pytest.mark.container

DOC = Path(__file__).resolve().parents[2] / "docs" / "client.md"
CONFTEST = '''import pathlib

import pytest


@pytest.fixture
def photo_bytes() -> bytes:
    return (pathlib.Path(__file__).parent / "photo.jpg").read_bytes()
'''


def backend_example() -> str:
    """The first Python block under the heading "Backend integration tests" of docs/client.md."""
    text = DOC.read_text()
    section = text[text.index("## Backend integration tests"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_backend_example_runs_as_written_in_the_light_venv(light_venv, tmp_path):
    example = backend_example()
    assert "from testkit.containers import" in example and "cls_client" in example
    (tmp_path / "test_backend_example.py").write_text(example)
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "photo.jpg").write_bytes(photo_jpeg(1))
    # the light venv's own packages only: no PYTHONPATH into this repository
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = light_venv.run("-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path),
                            timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert re.search(r"\b1 passed\b", result.stdout), result.stdout[-3000:]
    origin = light_venv.run("-c", "import cls_client, testkit.containers; print(cls_client.__file__, "
                                  "testkit.containers.__file__)", env=env, cwd=tmp_path)
    assert all(path.startswith(str(light_venv.path)) for path in origin.stdout.split()), origin.stdout
