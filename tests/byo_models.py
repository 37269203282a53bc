"""Bring-your-own model functions for ``tests/workloads/test_models.py`` (named as ``tests.byo_models:NAME``)."""

from __future__ import annotations

from torch import nn


def tiny_classifier() -> nn.Module:
    """A valid model for 64 features (scikit-learn digits) and 10 classes."""
    return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


def not_a_module() -> object:
    """Wrong: returns something that is not an ``nn.Module``."""
    return "a model, honest"


def no_parameters() -> nn.Module:
    """Wrong: a module with nothing to train."""
    return nn.ReLU()


def frozen() -> nn.Module:
    """Wrong: parameters exist but none is trainable."""
    model = nn.Linear(64, 10)
    model.requires_grad_(False)
    return model


def needs_arguments(hidden: int) -> nn.Module:
    """Wrong: the contract is a call with no arguments."""
    return nn.Linear(64, hidden)


def raises() -> nn.Module:
    """Wrong: the user's code fails."""
    raise RuntimeError("out of coffee")


NOT_CALLABLE = 42
