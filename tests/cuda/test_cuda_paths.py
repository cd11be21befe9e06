"""The CUDA code paths, on a real GPU (marker ``cuda``: deselected where CUDA is absent; bench/device_check.sh
runs them): autocast inference against fp32, channels_last, out-of-memory halving provoked by a real
allocation failure, GradScaler steps, pinned copies on a side stream, GPU JPEG decoding against the CPU's, and the
worker's batched GPU decode path (CLS_GPU_DECODE) with its per-image fallback."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ml.device import Capabilities, choose_policy, policy_for, stage_batch
from ml.preprocess import decode_cpu, decode_jpegs, is_baseline_jpeg
from testkit.photos import encode_jpeg, photo_jpegs, photos
from testkit.configs import decode_limits

pytestmark = pytest.mark.cuda
CLASSES = ["cat", "dog", "person", "coffee cup", "rocket", "flower", "building", "coins"]


@pytest.fixture(scope="module")
def clip():  # type: ignore[no-untyped-def]
    from ml.backbones import load_zero_shot_model

    return load_zero_shot_model("clip", "ViT-B-32", "random", device="cuda")


@pytest.fixture(scope="module")
def photo_batch(clip) -> torch.Tensor:  # type: ignore[no-untyped-def]
    from ml.preprocess import tensor_preprocess_for

    recipe = tensor_preprocess_for(clip)
    return recipe.batch([decode_cpu(data) for data in photo_jpegs()])


def test_autocast_inference_equals_fp32_within_tolerance(clip, photo_batch: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    assert clip.policy.amp_dtype in (torch.bfloat16, torch.float16)
    text = clip.text_embeddings(CLASSES, ["a photo of a {}."])
    mixed = clip.encode_images(photo_batch)
    amp_policy = clip.policy
    clip._policy = dataclasses.replace(amp_policy, amp_dtype=None)
    try:
        full = clip.encode_images(photo_batch)
    finally:
        clip._policy = amp_policy
    cosine = (mixed * full).sum(dim=1)
    assert cosine.min().item() > 0.99
    difference = (clip.scores(mixed, text) - clip.scores(full, text)).abs().max().item()
    print(f"autocast {amp_policy.amp_dtype} vs fp32: min cosine {cosine.min().item():.5f}, "
          f"max confidence difference {difference:.2e}")
    assert difference < 1e-2


def test_channels_last_for_conv_nets_with_the_same_outputs() -> None:
    import timm  # here, not at the top: the dry run collects this module, and timm takes a second to import

    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    reference = model.cuda()(torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0)).cuda()).float()
    policy = policy_for("cuda", model)
    assert policy.channels_last and policy.memory_format == torch.channels_last
    model.to(memory_format=policy.memory_format)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    batch = policy.to_device(torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    assert batch.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = model(batch).float()
    assert torch.allclose(out, reference.detach(), atol=1e-3, rtol=1e-3)
    assert not policy_for("cuda", timm.create_model("vit_tiny_patch16_224", pretrained=False)).channels_last


def test_out_of_memory_halves_the_batch_for_real(clip) -> None:  # type: ignore[no-untyped-def]
    from ml.zeroshot import encode_images_adaptive

    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    sizes: list[int] = []
    original = clip.encode_images

    def counting(pixels: torch.Tensor) -> torch.Tensor:
        sizes.append(pixels.shape[0])
        return original(pixels)

    batch = torch.rand(1024, 3, 224, 224)  # 616 MB as fp32 input alone
    expected = torch.cat([original(batch[i : i + 64]) for i in range(0, 1024, 64)])
    allowed = torch.cuda.memory_allocated() + 400 * 1024 * 1024
    clip.encode_images = counting
    torch.cuda.set_per_process_memory_fraction(allowed / total)
    try:
        out = encode_images_adaptive(clip, batch)
        with pytest.raises(torch.cuda.OutOfMemoryError):  # one image that does not fit is an error, not a loop
            torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 1024) / total)
            encode_images_adaptive(clip, batch[:4])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        del clip.encode_images
        torch.cuda.empty_cache()
    print(f"batch sizes tried: {sizes[:12]} ... ({len(sizes)} calls)")
    assert sizes[0] == 1024 and min(sizes) < 1024  # the full batch really failed and was halved
    assert out.shape == expected.shape
    assert (out * expected).sum(dim=1).min().item() > 0.99


def test_training_steps_with_fp16_and_grad_scaler(monkeypatch, trained_digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ml.training import NullCallbacks, train
    from tests.fixtures.trained_model import digits_spec

    fp16 = choose_policy(torch.device("cuda", 0), Capabilities(cuda_devices=1, bf16=False), conv_net=True)
    assert fp16.amp_dtype == torch.float16 and fp16.grad_scaler
    monkeypatch.setattr(Capabilities, "probe", classmethod(lambda cls: Capabilities(
        cuda_devices=torch.cuda.device_count(), current_cuda_index=torch.cuda.current_device(), bf16=False)))
    result = train(digits_spec(device="cuda", epochs=2), trained_digits.train, trained_digits.val, tmp_path / "run",
                   NullCallbacks())
    assert result.metrics["val_accuracy"] > 0.5
    assert all(torch.isfinite(torch.tensor(v)) for v in [result.metrics["train_loss"]])


def test_grad_scaler_skips_an_overflowing_step_and_applies_a_finite_one() -> None:
    model = torch.nn.Linear(8, 2).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    before = model.weight.detach().clone()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(torch.full((4, 8), 6e4, device="cuda")).float().sum() * 1e6  # overflows in fp16 grads
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(model.weight, before) and scaler.get_scale() < 2.0**16  # skipped, scale backed off
    optimizer.zero_grad()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(torch.randn(4, 8, device="cuda")).float().pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert not torch.equal(model.weight, before) and torch.isfinite(model.weight).all()


def test_pinned_copies_on_a_side_stream() -> None:
    rows = [torch.rand(3, 224, 224) for _ in range(16)]
    staged = stage_batch(rows, torch.device("cuda", 0))
    assert staged.host is not None and staged.host.is_pinned()
    assert staged.event is not None
    on_device = staged.get()
    assert on_device.device.type == "cuda" and staged.event is None
    assert torch.equal(on_device.cpu(), torch.stack(rows))
    assert stage_batch(rows, torch.device("cpu")).get().device.type == "cpu"


def test_gpu_jpeg_decode_matches_the_cpu_decode(clip) -> None:  # type: ignore[no-untyped-def]
    from ml.preprocess import tensor_preprocess_for

    datas = photo_jpegs() + [encode_jpeg(photos(("coffee",))[0], progressive=True)]
    decoded = decode_jpegs(datas, torch.device("cuda", 0))
    assert decoded[-1] is None and not is_baseline_jpeg(datas[-1])  # progressive: the CPU decodes it
    worst = 0.0
    for data, image in zip(datas[:-1], decoded[:-1], strict=True):
        assert image is not None and image.device.type == "cuda"
        cpu = decode_cpu(data)
        assert image.shape == cpu.shape
        difference = (image.cpu().float() - cpu.float()).abs()
        worst = max(worst, difference.mean().item())
        assert difference.mean().item() < 1.5  # IDCT / chroma upsampling differ slightly
    recipe = tensor_preprocess_for(clip)
    text = clip.text_embeddings(CLASSES, ["a photo of a {}."])
    gpu_scores = clip.scores(clip.encode_images(recipe.batch(decoded[:-1])), text)
    cpu_scores = clip.scores(clip.encode_images(recipe.batch([decode_cpu(d) for d in datas[:-1]])), text)
    print(f"GPU vs CPU decode: worst mean pixel difference {worst:.3f}, "
          f"max confidence difference {(gpu_scores - cpu_scores).abs().max().item():.2e}")
    assert torch.equal(gpu_scores.argmax(dim=1), cpu_scores.argmax(dim=1))
    assert (gpu_scores - cpu_scores).abs().max().item() < 1e-2


async def test_worker_decodes_baseline_jpegs_on_the_gpu_and_falls_back_per_image(clip) -> None:  # type: ignore[no-untyped-def]
    """handlers.preprocessing on a real GPU (tests/unit/test_batched_decode.py and the annotation handler test run
    the same with the CPU standing in): baseline JPEGs of concurrent images decoded in shared nvJPEG batches and
    preprocessed on the GPU, the rest on the CPU path with its errors; the same top-1 and confidences within 1e-2."""
    import asyncio

    from handlers.errors import ImageError
    from handlers.executor import Executors
    from handlers.models import ModelKey, ZeroShotHandle
    from handlers.preprocessing import Preprocessor, decode_and_preprocess

    handle = ZeroShotHandle(ModelKey("clip", "ViT-B-32", "random"), clip)
    limits = decode_limits()
    corrupt = bytearray(photo_jpegs(1)[0])
    corrupt[len(corrupt) // 3 : len(corrupt) // 3 + 2000] = b"\xff" * 2000
    datas = photo_jpegs() + [encode_jpeg(photos(("coffee",))[0], progressive=True), bytes(corrupt), b"not an image"]
    executors = Executors()
    preprocessor = Preprocessor("tensor", limits, executors, gpu_decode=True, max_batch=32, max_wait_ms=50)
    assert preprocessor.batched_device(handle) == clip.device

    async def one(data: bytes) -> torch.Tensor | str:
        try:
            return await preprocessor.pixels(data, handle, "cuda-test")
        except ImageError as exc:
            return exc.code

    try:
        got = await asyncio.gather(*(one(data) for data in datas))
    finally:
        await preprocessor.close()
        executors.shutdown()
    assert got[-1] == "not_an_image"
    stats = preprocessor.decode_batcher.stats
    print(f"GPU decode batches {stats.batches} for {stats.images} images; fallbacks {preprocessor.fallbacks}")
    assert stats.images == len(datas) - 2 and stats.batches < stats.images  # every baseline JPEG, batched
    assert all(isinstance(row, torch.Tensor) and row.device.type == "cuda" for row in got[:-3])
    assert isinstance(got[-3], torch.Tensor) and got[-3].device.type == "cpu"  # progressive: the CPU path
    assert preprocessor.fallbacks >= 1
    try:  # the corrupt JPEG: whatever the GPU decoder made of it, the outcome the CPU path has too (or pixels)
        expected: object = decode_and_preprocess(datas[-2], limits, handle, "tensor")
    except ImageError as exc:
        expected = exc.code
    assert isinstance(got[-2], torch.Tensor) or got[-2] == expected
    rows = got[:-3]
    cpu_rows = [decode_and_preprocess(data, limits, handle, "tensor") for data in datas[:-3]]
    rows.append(got[-3])  # with the progressive JPEG's CPU row: one batch of CUDA and CPU rows
    cpu_rows.append(decode_and_preprocess(datas[-3], limits, handle, "tensor"))
    text = clip.text_embeddings(CLASSES, ["a photo of a {}."])
    gpu_scores = clip.scores(handle.forward(handle.stage(rows)), text)  # type: ignore[arg-type]
    cpu_scores = clip.scores(handle.forward(handle.stage(cpu_rows)), text)
    print(f"worker GPU decode vs CPU path: max confidence difference {(gpu_scores - cpu_scores).abs().max().item():.2e}")
    assert torch.equal(gpu_scores.argmax(dim=1), cpu_scores.argmax(dim=1))
    assert (gpu_scores - cpu_scores).abs().max().item() < 1e-2
