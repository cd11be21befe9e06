"""Errors of loading models and weight files: the bottom of ``ml``, importing nothing of the project.

Every module that builds a model or reads a weight file raises these; the handlers map them to wire error
codes by type. Training's own errors (dataset, config, package, ...) are in ``ml.training.errors``.
"""

from __future__ import annotations

__all__ = ["ModelLoadError", "WeightsFileError"]


class ModelLoadError(Exception):
    """A model could not be built or its weights could not be loaded (unknown variant, weights not
    fetchable, unsafe or mismatched weight file, unusable device)."""


class WeightsFileError(Exception):
    """A weight file is missing, unreadable, unsafe (arbitrary pickle) or not a state dict."""
