"""Datasets a worker can train on, loaded from files that ship with a dependency."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ranger_ps.errors import UserError


@dataclass(frozen=True)
class Dataset:
    """A classification dataset held in memory as tensors."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _digits() -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package).

    The split is fixed (stratified 80/20 with its own seed) so every run and every worker sees the
    same held-out test set, whatever ``--seed`` says.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(list(range(len(y))), test_size=0.2, random_state=0, stratify=bunch.target)
    return Dataset("digits", x[idx_train], y[idx_train], x[idx_test], y[idx_test], 10)


DATASETS: dict[str, Callable[[], Dataset]] = {"digits": _digits}


def load_dataset(name: str) -> Dataset:
    """Load a dataset by name; an unknown name is a :class:`UserError` listing the known ones."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(sorted(DATASETS))}") from None
    return loader()


def shard_indices(num_examples: int, worker_index: int, num_workers: int) -> torch.Tensor:
    """The training examples this worker owns: every ``num_workers``-th, from ``worker_index``."""
    return torch.arange(worker_index % num_workers, num_examples, num_workers)
