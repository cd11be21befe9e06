"""Per-run checkpoint: one file written atomically (tmp + fsync + rename), read back with weights_only=True."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
CHECKPOINT_VERSION = 1


def checkpoint_path(workdir: Path) -> Path:
    return Path(workdir) / CHECKPOINT_DIR / STATE_FILE


def save_checkpoint(workdir: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``workdir/checkpoint/state.pt`` atomically; the previous one stays until replaced."""
    path = checkpoint_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        torch.save({"version": CHECKPOINT_VERSION, **state}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def load_checkpoint(workdir: Path) -> dict[str, Any] | None:
    """The saved state, or None when there is none (or it cannot be read: logged, and training starts over)."""
    path = checkpoint_path(workdir)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable: a fresh start is the only safe thing to do
        log.warning("ignoring unreadable checkpoint %s: %s", path, exc)
        return None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        log.warning("ignoring checkpoint %s with unknown version", path)
        return None
    return state


def capture_rng_state() -> dict[str, Any]:
    """python, numpy, torch (and CUDA when initialised) RNG states, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state (CUDA states restored when the device count matches)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
