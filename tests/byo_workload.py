"""A user's own workload living in the test suite (``--model tests.byo_workload:model``, ``--dataset ...:dataset``).

Written the way a user would write it next to their training script: a model function taking no
arguments and a dataset function returning ``(train, test)`` torch datasets of ``(x, y)`` pairs.
The problem is four well-separated Gaussian blobs in 16 dimensions, fixed by a seed, so every
worker and every run sees the same data and a couple of epochs reach a test accuracy above 0.9.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

FEATURES = 16
"""Input features per example."""

CLASSES = 4
"""Number of blobs (classes)."""

TRAIN_EXAMPLES = 2000
TEST_EXAMPLES = 400
SEED = 1234
SEPARATION = 3.0
"""Scale of the blob centres; the noise around each centre has unit variance per feature."""


def model() -> nn.Module:
    """A small MLP for :func:`dataset`: 16 features, 32 hidden ReLU units, 4 class logits."""
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES))


def _blobs(n: int, centres: torch.Tensor, generator: torch.Generator) -> TensorDataset:
    """``n`` examples: a random blob for each, its centre plus standard Gaussian noise."""
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    x = centres[labels] + torch.randn(n, FEATURES, generator=generator)
    return TensorDataset(x, labels)


def dataset() -> tuple[TensorDataset, TensorDataset]:
    """``(train, test)``: 2,000 and 400 examples of float32 features and int64 labels 0..3 (deterministic)."""
    generator = torch.Generator().manual_seed(SEED)
    centres = torch.randn(CLASSES, FEATURES, generator=generator) * SEPARATION
    return _blobs(TRAIN_EXAMPLES, centres, generator), _blobs(TEST_EXAMPLES, centres, generator)
