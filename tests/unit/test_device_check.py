"""bench/device_check.sh --dry: the device script runs end to end on the CPU (tiny sizes), so it never rots
before a GPU machine is lent; its results file holds every section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_device_check_dry_run_passes_and_writes_one_results_file(tmp_path: Path) -> None:
    out = tmp_path / "results.txt"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(REPO / "bench" / "device_check.sh"), "--dry", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=500)
    text = out.read_text()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "result: 0 failed step(s)" in text
    for heading in ("1. versions", "2. tests marked cuda", "3+4. annotation and training bench"):
        assert heading in text
    assert "torch 2." in text
    assert "CUDA tests deselected" in text or "passed" in text  # the cuda tests were collected (or ran)
    bench = json.loads(next(line for line in text.splitlines() if line.startswith("BENCH_JSON "))[len("BENCH_JSON "):])
    assert bench["dry"] and bench["preprocess"]["tensor_img_s"] > 0 and bench["preprocess"]["pil_img_s"] > 0
    assert bench["preprocess"]["max_pixel_difference"] < 0.02
    assert [row["variant"] for row in bench["annotation"]] == ["cls-tiny-clip"]
    assert len(bench["training"]) == 4 and all(row["amp_img_s"] > 0 and row["fp32_img_s"] > 0
                                               for row in bench["training"])
