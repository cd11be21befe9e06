"""The device and precision policy (ml.device): pure decisions over a capability description, so every
branch (CUDA with and without bf16, several devices) is checked on a CPU-only machine; and the models that
use it (zero-shot, custom inference, training) take their policy from it."""

from __future__ import annotations

import pytest
import timm
import torch

from ml.device import Capabilities, DevicePolicy, choose_device, choose_policy, is_conv_net, policy_for

CPU_ONLY = Capabilities()
AMPERE = Capabilities(cuda_devices=2, current_cuda_index=1, bf16=True)
TURING = Capabilities(cuda_devices=1, bf16=False)


@pytest.mark.parametrize(
    ("spec", "capabilities", "expected"),
    [
        ("auto", CPU_ONLY, torch.device("cpu")),
        ("auto", AMPERE, torch.device("cuda", 1)),  # the current device, not always 0
        ("cuda", AMPERE, torch.device("cuda", 1)),
        ("cuda:0", AMPERE, torch.device("cuda", 0)),
        ("cpu", AMPERE, torch.device("cpu")),
        (torch.device("cuda", 0), TURING, torch.device("cuda", 0)),
    ],
)
def test_device_choice(spec: str, capabilities: Capabilities, expected: torch.device) -> None:
    assert choose_device(spec, capabilities) == expected


@pytest.mark.parametrize(
    ("spec", "capabilities", "message"),
    [
        ("cuda", CPU_ONLY, "CUDA is not available"),
        ("cuda:2", AMPERE, "only 2 CUDA devices"),
        ("cuda:7", TURING, "only 1 CUDA devices"),
        ("mps", AMPERE, "unsupported device type"),
        ("gpu", AMPERE, "unknown device"),
        ("", CPU_ONLY, "unknown device"),
    ],
)
def test_unusable_devices_are_refused_by_name(spec: str, capabilities: Capabilities, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_device(spec, capabilities)


def test_cpu_is_fp32_contiguous_without_scaler_whatever_the_model() -> None:
    policy = choose_policy(torch.device("cpu"), AMPERE, conv_net=True)
    assert policy == DevicePolicy(torch.device("cpu"), amp_dtype=None, grad_scaler=False, channels_last=False)
    assert not policy.pin_memory
    assert policy.memory_format == torch.contiguous_format


def test_cuda_with_bf16_autocasts_to_bf16_without_a_scaler() -> None:
    policy = choose_policy(torch.device("cuda", 0), AMPERE, conv_net=False)
    assert (policy.amp_dtype, policy.grad_scaler, policy.channels_last, policy.pin_memory) == (
        torch.bfloat16, False, False, True)


def test_cuda_without_bf16_autocasts_to_fp16_with_a_scaler() -> None:
    policy = choose_policy(torch.device("cuda", 0), TURING, conv_net=True)
    assert (policy.amp_dtype, policy.grad_scaler) == (torch.float16, True)
    assert policy.memory_format == torch.channels_last


@pytest.mark.parametrize(
    ("name", "conv_net"),
    [("resnet10t", True), ("efficientnet_b0", True), ("convnext_atto", True),
     ("vit_tiny_patch16_224", False), ("swin_tiny_patch4_window7_224", False)],
)
def test_channels_last_is_for_conv_nets_only(name: str, conv_net: bool) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=2)
    assert is_conv_net(model) is conv_net
    assert choose_policy(torch.device("cuda", 0), AMPERE, conv_net=is_conv_net(model)).channels_last is conv_net


def test_policy_on_this_machine_matches_what_it_offers() -> None:
    policy = policy_for("auto", torch.nn.Conv2d(3, 3, 1))
    assert policy.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert policy.amp_dtype is None
        with pytest.raises(ValueError, match="CUDA is not available"):
            policy_for("cuda")


def test_cpu_transfer_keeps_the_batch_on_the_cpu_unpinned() -> None:
    policy = policy_for("cpu")
    batch = torch.rand(2, 3, 4, 4).permute(0, 1, 3, 2)  # not contiguous
    moved = policy.to_device(batch)
    assert moved.device.type == "cpu" and moved.is_contiguous() and not moved.is_pinned()
    assert torch.equal(moved, batch)


def test_zero_shot_custom_and_training_share_the_policy(trained_digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ml.trained import TrainedModel
    from ml.training import NullCallbacks, train
    from ml.training.errors import ConfigError, PackageError
    from ml.training.loop import _TrainingRun
    from ml.backbones import load_zero_shot_model
    from ml.errors import ModelLoadError
    from tests.fixtures.trained_model import digits_spec

    here = Capabilities.probe()
    clip = load_zero_shot_model("clip", "cls-tiny-clip", "random", device="auto")
    assert clip.policy == policy_for("auto", clip.module)  # type: ignore[attr-defined]
    trained = TrainedModel.load(trained_digits.package_dir, device="auto")
    assert trained.policy == choose_policy(choose_device("auto", here), here, conv_net=True)  # resnet10t
    run = _TrainingRun(digits_spec(device="auto", epochs=1), trained_digits.train[:8], trained_digits.val[:8],
                       tmp_path / "run", NullCallbacks())
    try:
        assert run.policy == trained.policy
    finally:
        run.close()
    if not here.cuda_devices:  # the same refusal, as each caller's own error type
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            load_zero_shot_model("clip", "cls-tiny-clip", "random", device="cuda")
        with pytest.raises(PackageError, match="CUDA is not available"):
            TrainedModel.load(trained_digits.package_dir, device="cuda")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            train(digits_spec(device="cuda"), trained_digits.train[:8], trained_digits.val[:8], tmp_path / "cuda",
                  NullCallbacks())
