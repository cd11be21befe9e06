"""Samples on local disk: validation, stratified split, decoding dataset, per-epoch deterministic batches."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ml.training.errors import DatasetError

Sample = tuple[str, int]
"""``(path, class index)``; a multi-label sample is ``(path, tuple of class indices)`` (possibly empty)."""


def stratified_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split ``samples`` into (train, val), taking ``round(fraction * n_c)`` of each class for val.

    Every class with at least 2 samples gives at least one to val and keeps at least one for train; a class with
    a single sample stays in train. Deterministic for a given seed; both outputs keep the input order.
    Multi-label samples (a tuple of class indices) are grouped by their rarest tag (images without tags form one
    more group), so every tag with a few images lands in both splits.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    by_class: dict[int, list[int]] = defaultdict(list)
    tag_counts: dict[int, int] = defaultdict(int)
    for _, label in samples:
        if isinstance(label, tuple):
            for tag in label:
                tag_counts[tag] += 1
    for index, (_, label) in enumerate(samples):
        if isinstance(label, tuple):
            group = min(label, key=lambda t: (tag_counts[t], t)) if label else -1
        else:
            group = int(label)
        by_class[group].append(index)
    rng = random.Random(seed)
    val_indices: set[int] = set()
    for label in sorted(by_class):
        indices = by_class[label]
        if len(indices) < 2:
            continue
        take = min(max(1, round(fraction * len(indices))), len(indices) - 1)
        shuffled = indices[:]
        rng.shuffle(shuffled)
        val_indices.update(shuffled[:take])
    train = [samples[i] for i in range(len(samples)) if i not in val_indices]
    val = [samples[i] for i in range(len(samples)) if i in val_indices]
    return train, val


def check_samples(samples: Sequence[Sample], num_classes: int, split: str, multi_label: bool = False) -> list[Sample]:
    """Return the samples as ``(str path, int label)`` (multi-label: ``(str path, tuple of distinct sorted class
    indices)``); DatasetError when empty or a label is out of range."""
    if not samples:
        raise DatasetError(f"the {split} split is empty")
    checked: list[Sample] = []
    for path, label in samples:
        if multi_label:
            if not isinstance(label, (tuple, list)) or any(
                    isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_classes for t in label):
                raise DatasetError(f"{split} sample {path!s}: labels {label!r} are not class indices in [0, {num_classes})")
            if len(set(label)) != len(label):
                raise DatasetError(f"{split} sample {path!s}: labels {label!r} repeat a class")
            checked.append((str(path), tuple(sorted(int(t) for t in label))))
            continue
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_classes:
            raise DatasetError(f"{split} sample {path!s}: label {label!r} is not a class index in [0, {num_classes})")
        checked.append((str(path), int(label)))
    return checked


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to RGB; DatasetError naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot decode image {path}: {exc}") from exc


def split_readable(samples: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
    """(readable, unreadable) by fully decoding each image; lets a caller apply its bad-image budget first."""
    readable: list[Sample] = []
    unreadable: list[Sample] = []
    for sample in samples:
        try:
            load_rgb(sample[0])
        except DatasetError:
            unreadable.append(sample)
        else:
            readable.append(sample)
    return readable, unreadable


class ImageFileDataset(Dataset):
    """``(path, label)`` samples decoded with PIL (``convert("RGB")``) and transformed. With ``num_classes``,
    labels are tuples of class indices, returned as multi-hot float vectors."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, num_classes: int | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        path, label = self.samples[index]
        if self.num_classes is not None:
            target = torch.zeros(self.num_classes, dtype=torch.float32)
            target[list(label)] = 1.0
            return self.transform(load_rgb(path)), target
        return self.transform(load_rgb(path)), label


class EpochBatches:
    """Batch sampler: a permutation fixed by (seed, epoch), cut into batches, from a start step on.

    The order depends on nothing but (seed, epoch), so a run resumed mid-epoch continues with the very batches
    an uninterrupted run would have used. A trailing batch of one sample is dropped when there are others
    (BatchNorm cannot train on a batch of one). With ``weights`` (one per sample) an epoch is ``num_samples``
    draws with replacement in proportion to them (balanced sampling), still fixed by (seed, epoch).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, shuffle: bool = True,
                 weights: Sequence[float] | None = None) -> None:
        if weights is not None and len(weights) != num_samples:
            raise ValueError(f"{len(weights)} sampling weights for {num_samples} samples")
        self.weights = None if weights is None else torch.as_tensor(list(weights), dtype=torch.float64)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        if rest == 1 and full > 0 and self.shuffle:
            return full
        return full + (1 if rest else 0)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch
        self.start_step = start_step

    def batches(self) -> list[list[int]]:
        if self.shuffle and self.weights is not None:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator).tolist()
        elif self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        cut = [order[i : i + self.batch_size] for i in range(0, self.num_samples, self.batch_size)]
        return cut[: self.steps_per_epoch]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.start_step :]

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start_step)


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    """How many samples each class has."""
    counts = [0] * num_classes
    for _, label in samples:
        counts[label] += 1
    return counts


def balanced_class_weights(samples: Sequence[Sample], num_classes: int) -> list[float]:
    """``n / (C_present * n_c)`` per class (1.0 for a class with no sample): the classes' loss weights for
    ``class_weighting: balanced`` (scikit-learn's "balanced" heuristic)."""
    counts = class_counts(samples, num_classes)
    present = sum(1 for c in counts if c)
    return [len(samples) / (present * c) if c else 1.0 for c in counts]


def balanced_sample_weights(samples: Sequence[Sample], num_classes: int) -> list[float]:
    """``1 / n_c`` per sample: with these sampling weights every class is drawn equally often."""
    counts = class_counts(samples, num_classes)
    return [1.0 / counts[label] for _, label in samples]


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    """A 63-bit seed derived from (seed, epoch, salt)."""
    return (seed * 1_000_003 + epoch * 7_919 + salt * 104_729 + 0x5EED) % (2**63 - 1)
