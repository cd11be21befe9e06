"""TrainedModel refuses anything but a well-formed safetensors package."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ml.trained import TrainedModel
from ml.training import PackageError
from tests.fixtures.trained_model import digits_dataset, trained_digits  # noqa: F401  (fixtures)


@pytest.fixture
def package_copy(trained_digits, tmp_path):
    target = tmp_path / "package"
    shutil.copytree(trained_digits.package_dir, target)
    return target


def test_refuses_a_package_with_pickled_weights_only(package_copy):
    state = torch.nn.Linear(2, 2).state_dict()
    (package_copy / "model.safetensors").unlink()
    torch.save(state, package_copy / "pytorch_model.bin")
    with pytest.raises(PackageError, match="only safetensors"):
        TrainedModel.load(package_copy)


def test_refuses_a_config_naming_other_weights(package_copy):
    config = json.loads((package_copy / "config.json").read_text())
    config["weights"] = "model.pt"
    (package_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(PackageError, match="refused"):
        TrainedModel.load(package_copy)


def test_refuses_a_directory_without_config(tmp_path):
    with pytest.raises(PackageError, match="config.json"):
        TrainedModel.load(tmp_path)


def test_refuses_weights_of_another_shape(package_copy):
    config = json.loads((package_copy / "config.json").read_text())
    config["class_names"] = config["class_names"][:5]
    config["num_classes"] = 5
    (package_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(PackageError, match="does not fit"):
        TrainedModel.load(package_copy)
