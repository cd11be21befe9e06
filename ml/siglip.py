"""SigLIP zero-shot models, built and run through transformers' ``SiglipModel``.

Architectures for offline builds (random or state-dict weights) come from
``ml/model_configs/siglip/variants.json`` (the hub ``google/siglip-*`` configs, plus the tiny
``cls-tiny-siglip`` used by tests). Weights:

- ``"random"``: ``SiglipModel(SiglipConfig(...))`` of the variant under ``torch.manual_seed(seed)``.
  The real SigLIP tokenizer is a sentencepiece file on the hub, so random models use an offline
  tokenizer instead: CLIP's byte-level BPE (vocab 49408) as shipped inside open_clip, wrapped as a
  transformers ``CLIPTokenizer``; the text tower's ``vocab_size`` is set to 49408 to match. As with
  SigLIP's own tokenizer, text is padded to ``max_length`` (the text config's
  ``max_position_embeddings``, 64) with the end-of-text token, and no attention mask is used.
- a local state-dict file for the variant's architecture: the vocabulary size is read from the
  file; 49408 means the bundled BPE tokenizer, anything else the variant's own tokenizer, which must
  then be in the local hub cache.
- a local directory as written by ``save_pretrained`` (see :func:`save_siglip_directory`): model,
  tokenizer and image processor all from that directory.
- ``"pretrained"`` (the variant's hub id) or another hub id: ``from_pretrained`` through the hub cache.

Preprocessing is exactly transformers' ``SiglipImageProcessor`` (the default, torchvision backend):
composite onto white / convert to RGB, resize to ``image_size`` x ``image_size`` (bicubic, antialiased,
on uint8), rescale by 1/255 and normalise with mean = std = 0.5.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as tvF
from PIL import Image

from ml.device import place_for_inference
from ml.embedding import ModelInfo, WeightsSource
from ml.errors import ModelLoadError, WeightsFileError
from ml.text_cache import TextEmbeddingCache
from ml.weights import load_state_dict_file
from ml.zeroshot import ZeroShotEmbeddingModel, sigmoid_logits, sigmoid_scores

__all__ = [
    "BUNDLED_VOCAB_SIZE",
    "SiglipZeroShotModel",
    "bundled_bpe_tokenizer",
    "known_variants",
    "load_siglip",
    "save_siglip_directory",
    "siglip_config",
]

VARIANTS_FILE = Path(__file__).parent / "model_configs" / "siglip" / "variants.json"
BUNDLED_VOCAB_SIZE = 49408
"""Vocabulary size of the offline BPE tokenizer used with random SigLIP weights."""
_TOKEN_EMBEDDING_KEY = "text_model.embeddings.token_embedding.weight"


@functools.cache
def _variants() -> dict[str, dict[str, Any]]:
    with VARIANTS_FILE.open(encoding="utf-8") as f:
        return json.load(f)["variants"]


def known_variants() -> list[str]:
    """SigLIP variants whose architecture is known offline."""
    return sorted(_variants())


def siglip_config(variant: str, *, vocab_size: int | None = None) -> Any:
    """The ``SiglipConfig`` of a known ``variant`` (optionally with another text vocabulary size)."""
    from transformers import SiglipConfig

    try:
        spec = _variants()[variant]
    except KeyError:
        raise ModelLoadError(
            f"unknown SigLIP variant {variant!r} for offline weights; known: {known_variants()}"
        ) from None
    text_config = dict(spec["text_config"])
    if vocab_size is not None:
        text_config["vocab_size"] = vocab_size
    return SiglipConfig(text_config=text_config, vision_config=dict(spec["vision_config"]))


@functools.cache
def _bundled_bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    # Same construction as open_clip.tokenizer.SimpleTokenizer, with transformers' special-token names.
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(vocab)}, merges  # type: ignore[return-value]


def bundled_bpe_tokenizer() -> Any:
    """A new ``CLIPTokenizer`` over the BPE vocabulary bundled with open_clip (works offline).

    Same ids as open_clip's ``SimpleTokenizer`` (49406 start, 49407 end; padding here uses 49407).
    """
    from transformers import CLIPTokenizer

    vocab, merges = _bundled_bpe_vocab()
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges))
    assert len(tokenizer) == BUNDLED_VOCAB_SIZE
    return tokenizer


class SiglipPreprocess:
    """``SiglipImageProcessor``'s transform for one image, as plain torchvision ops (thread-safe).

    Built from a processor's settings; equal to ``processor(images=image)["pixel_values"][0]``.
    """

    def __init__(self, processor: Any) -> None:
        size = processor.size
        height, width = (size["height"], size["width"]) if "height" in size else (None, None)
        if (
            height is None
            or getattr(processor, "do_center_crop", False)
            or getattr(processor, "do_pad", False)
            or not processor.do_resize
        ):
            raise ModelLoadError(f"unsupported SigLIP image processor settings: {processor.to_dict()}")
        from transformers.image_utils import pil_torch_interpolation_mapping

        self.size = (int(height), int(width))
        self.do_convert_rgb = bool(processor.do_convert_rgb)
        self.interpolation = pil_torch_interpolation_mapping[processor.resample]
        self.do_rescale = bool(processor.do_rescale)
        self.rescale_factor = float(processor.rescale_factor)
        self.do_normalize = bool(processor.do_normalize)
        # transformers fuses rescale into normalisation the same way: mean and std divided by the factor.
        scale = 1.0 / self.rescale_factor if self.do_rescale else 1.0
        self.mean = (torch.tensor(processor.image_mean) * scale).tolist()
        self.std = (torch.tensor(processor.image_std) * scale).tolist()

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from transformers.image_transforms import convert_to_rgb

        array = convert_to_rgb(image, return_numpy=True) if self.do_convert_rgb else np.array(image)
        pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()
        pixels = tvF.resize(pixels, list(self.size), interpolation=self.interpolation, antialias=True)
        if self.do_normalize:
            return tvF.normalize(pixels.to(torch.float32), self.mean, self.std)
        if self.do_rescale:
            return pixels * self.rescale_factor
        return pixels.to(torch.float32)


class SiglipZeroShotModel(ZeroShotEmbeddingModel):
    """A transformers ``SiglipModel`` as a :class:`~ml.zeroshot.ZeroShotModel` (sigmoid confidences)."""

    preprocess_bytes_per_pixel = 16  # the full-size frame as bytes, numpy, a contiguous tensor; resize work (~12 measured)

    def __init__(
        self,
        module: Any,
        tokenizer: Any,
        image_processor: Any,
        info: ModelInfo,
        device: torch.device,
        text_cache: TextEmbeddingCache,
    ) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self._transform = SiglipPreprocess(image_processor)
        super().__init__(info, device, self._transform.size[0], text_cache)
        self.max_text_length = int(module.config.text_config.max_position_embeddings)
        self.logit_scale = module.logit_scale.detach().float().exp().cpu()
        self.logit_bias = module.logit_bias.detach().float().cpu()

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._transform(image)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids ``[N, max_text_length]``, padded to max length as SigLIP was trained."""
        encoded = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_text_length, truncation=True, return_tensors="pt"
        )
        return encoded["input_ids"]

    def scores(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        return sigmoid_scores(image_embeddings, text_embeddings, self.logit_scale, self.logit_bias)

    multi_label_extra_classes: tuple[str, ...] = ()

    def multi_label_scores(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Independent per-class sigmoids by construction: the same as :meth:`scores`."""
        return self.scores(image_embeddings, text_embeddings)

    def multi_label_logits(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """The logits of :meth:`multi_label_scores` (their sigmoid is the confidence), ``[B, C]``."""
        return sigmoid_logits(image_embeddings, text_embeddings, self.logit_scale, self.logit_bias)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module.vision_model(pixel_values=pixels).pooler_output

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.module.text_model(input_ids=tokens).pooler_output


def load_siglip(
    variant: str, source: WeightsSource, *, device: torch.device, text_cache: TextEmbeddingCache, seed: int = 0
) -> SiglipZeroShotModel:
    """Build SigLIP ``variant`` with ``source`` weights on ``device`` (eval mode)."""
    try:
        module, tokenizer, processor = _load_parts(variant, source, seed)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load SigLIP {variant} with weights {source.value!r}: {exc}") from exc
    place_for_inference(module, device, f"SigLIP {variant}")
    info = ModelInfo(family="siglip", variant=variant, weights=source.value)
    return SiglipZeroShotModel(module, tokenizer, processor, info, device, text_cache)


def save_siglip_directory(model: SiglipZeroShotModel, path: str | os.PathLike[str]) -> Path:
    """Write model (safetensors), tokenizer and image processor with ``save_pretrained``; loadable
    again by passing the directory as the weights spec."""
    target = Path(path)
    model.module.save_pretrained(target)
    model.tokenizer.save_pretrained(target)
    model.image_processor.save_pretrained(target)
    return target


def _load_parts(variant: str, source: WeightsSource, seed: int) -> tuple[Any, Any, Any]:
    from transformers import AutoImageProcessor, AutoTokenizer, SiglipModel

    if source.kind == "directory":
        directory = source.value
        module = SiglipModel.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        if (Path(directory) / "preprocessor_config.json").is_file():
            processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True)
        else:
            processor = _default_processor(module.config.vision_config.image_size)
        return module, tokenizer, processor
    if source.kind == "pretrained":
        hub_id = variant if source.value == "pretrained" else source.value
        try:
            module = SiglipModel.from_pretrained(hub_id, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(hub_id)
            processor = AutoImageProcessor.from_pretrained(hub_id)
        except Exception as exc:
            raise ModelLoadError(f"cannot fetch pretrained SigLIP {hub_id!r} (hub cache or download): {exc}") from exc
        return module, tokenizer, processor

    state: dict[str, torch.Tensor] | None = None
    vocab_size = BUNDLED_VOCAB_SIZE
    if source.kind == "file":
        try:
            state = load_state_dict_file(source.value)
        except WeightsFileError as exc:
            raise ModelLoadError(str(exc)) from exc
        if _TOKEN_EMBEDDING_KEY in state:
            vocab_size = int(state[_TOKEN_EMBEDDING_KEY].shape[0])
    config = siglip_config(variant, vocab_size=vocab_size)
    with _seeded(seed):
        module = SiglipModel(config)
    if state is not None:
        _load_state(module, state, variant, source.value)
    if vocab_size == BUNDLED_VOCAB_SIZE:
        tokenizer = bundled_bpe_tokenizer()
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(variant)
        except Exception as exc:
            raise ModelLoadError(
                f"weights {source.value!r} have a {vocab_size}-token vocabulary, which needs the tokenizer of "
                f"{variant} from the hub cache: {exc}"
            ) from exc
    processor = _default_processor(config.vision_config.image_size)
    return module, tokenizer, processor


def _default_processor(image_size: int) -> Any:
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": image_size, "width": image_size})


def _load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], variant: str, origin: str) -> None:
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ModelLoadError(f"weights in {origin} do not fit SigLIP {variant}: {exc}") from exc
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelLoadError(
            f"weights in {origin} do not fit SigLIP {variant}: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)})"
        )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run with the CPU RNG seeded to ``seed``, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
