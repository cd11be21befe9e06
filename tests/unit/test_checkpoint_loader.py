"""One checkpoint reader: serving (``ml.weights.load_state_dict_file``) and fine-tuning (``read_state_dict``)
unwrap the same checkpoints the same way, and refuse the same ones."""

import pickle

import pytest
import torch

from ml.errors import WeightsFileError
from ml.training.errors import PretrainedWeightsError
from ml.training.models import read_state_dict
from ml.weights import load_state_dict_file, save_state_dict


@pytest.fixture
def state():
    return {"conv.weight": torch.randn(4, 3, 3, 3), "fc.bias": torch.randn(2)}


@pytest.mark.parametrize("wrap", [
    lambda s: s,
    lambda s: {"state_dict": s, "epoch": 3},
    lambda s: {"model": s, "optimizer": {"lr": torch.tensor(0.1)}},
    lambda s: {"state_dict_ema": s, "state_dict": {k: torch.zeros_like(v) for k, v in s.items()}},
    lambda s: {"module": {f"module.{k}": v for k, v in s.items()}},
    lambda s: {"model": {f"_orig_mod.{k}": v for k, v in s.items()}},
    lambda s: {f"module._orig_mod.{k}": v for k, v in s.items()},
], ids=["plain", "state_dict", "model", "ema-first", "module", "compiled", "ddp-compiled"])
def test_serving_and_fine_tuning_unwrap_alike(state, wrap, tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save(wrap(state), path)
    for loaded in (load_state_dict_file(path), read_state_dict(path)):
        assert set(loaded) == set(state)
        for name, tensor in state.items():
            assert torch.equal(loaded[name], tensor)


def test_safetensors_found_by_its_header(state, tmp_path):
    path = save_state_dict(state, tmp_path / "weights.safetensors").rename(tmp_path / "weights.bin")
    assert set(load_state_dict_file(path)) == set(state)


class _Payload:
    def __reduce__(self):
        return (print, ("never",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("content", ["pickle", "not-tensors", "missing"])
def test_both_paths_refuse_with_the_one_error(content, tmp_path):
    path = tmp_path / "bad.pt"
    if content == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": {"w": torch.ones(1)}, "x": _Payload()}))
    elif content == "not-tensors":
        torch.save({"state_dict": {"w": 1}}, path)
    with pytest.raises(WeightsFileError):
        load_state_dict_file(path)
    with pytest.raises(PretrainedWeightsError) as info:
        read_state_dict(path)
    assert isinstance(info.value.__cause__, WeightsFileError)
