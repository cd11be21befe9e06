"""``make test`` / ``make run`` set up idempotently: once set up, nothing is reinstalled."""

from __future__ import annotations

import shutil
import subprocess

from testkit.local import REPO


def test_setup_is_up_to_date_after_it_ran():
    assert shutil.which("make"), "make is required"
    # -q: exit 0 only when every setup target (venv, editable install, Kafka jars) is up to date
    out = subprocess.run(["make", "-q", "setup"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, "a second `make test` would reinstall: " + subprocess.run(
        ["make", "-n", "setup"], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    dry = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    assert "pip install" not in dry and "mvn" not in dry and "kafka.sh jars" not in dry, dry
