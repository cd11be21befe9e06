"""bench/device_check.sh --dry: the device script runs end to end on the CPU (tiny sizes), so it never rots
before a GPU machine is lent; its results file holds every section, in order. Kept fast (about 15 s of CPU: mostly
imports) by a versions step that does not import torch, the bench running beside the collection of the cuda tests,
cached sample photos and timm's tiny test networks for the training section."""

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
    headings = ("1. versions", "2. tests marked cuda", "3+4. annotation and training bench", "result:")
    positions = [text.index(heading) for heading in headings]
    assert positions == sorted(positions)
    assert "torch 2." in text
    assert "CUDA tests deselected" in text or "passed" in text  # the cuda tests were collected (or ran)
    bench = json.loads(next(line for line in text.splitlines() if line.startswith("BENCH_JSON "))[len("BENCH_JSON "):])
    assert bench["dry"] and bench["preprocess"]["tensor_img_s"] > 0 and bench["preprocess"]["pil_img_s"] > 0
    assert bench["preprocess"]["max_pixel_difference"] < 0.02
    assert [row["variant"] for row in bench["annotation"]] == ["cls-tiny-clip"]
    assert len(bench["training"]) == 4 and all(row["amp_img_s"] > 0 and row["fp32_img_s"] > 0
                                               for row in bench["training"])
    for row in bench["training"]:  # the real train() ran both ways on the synthetic image set, in fp32 on the CPU
        assert row["train_images"] == 8 and row["epochs"] == 1 and row["fp32_dtype"] == "float32"
    assert text.index("BENCH_JSON ") > text.index("2. tests marked cuda")  # the bench's output in section order
