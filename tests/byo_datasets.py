"""Bring-your-own dataset functions for ``tests/workloads/test_data.py`` (named as ``tests.byo_datasets:NAME``)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset


class Items(Dataset[Any]):
    """A map-style dataset over a list of arbitrary items (to build broken ones)."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


class Stream(IterableDataset[Any]):
    """An iterable-style dataset (not allowed: it has no length)."""

    def __iter__(self) -> Any:
        return iter([(torch.zeros(2), 0)])


def _features(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def classify() -> tuple[TensorDataset, TensorDataset]:
    """Float64 features (stored as float32), 0-d int64 labels 0..3; 5000 train items (two batches)."""
    y_train = torch.arange(5000) % 3
    y_test = torch.tensor([0, 3, 1])
    return TensorDataset(_features(5000, 1), y_train), TensorDataset(_features(3, 2), y_test)


def classify_int_labels() -> tuple[Items, Items]:
    """Items with Python int labels."""
    return Items([(torch.ones(2, 2), 1), (torch.zeros(2, 2), 4)]), Items([(torch.ones(2, 2), 0)])


def uint8_images() -> tuple[Items, Items]:
    """uint8 images (C, H, W) with int labels: stored as uint8, normalized per channel by prepare()."""
    images = torch.randint(0, 256, (8, 3, 4, 4), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    return Items([(images[i], i % 2) for i in range(6)]), Items([(images[i], i % 2) for i in range(6, 8)])


def language_model() -> tuple[TensorDataset, TensorDataset]:
    """LM: y is integer token ids shaped like x (next token at every position)."""
    tokens = torch.arange(40).remainder(7).view(4, 10)
    return TensorDataset(tokens[:3, :-1], tokens[:3, 1:]), TensorDataset(tokens[3:, :-1], tokens[3:, 1:])


def not_a_pair() -> TensorDataset:
    """Returns one dataset instead of (train, test)."""
    return TensorDataset(torch.zeros(2, 2), torch.zeros(2, dtype=torch.int64))


def not_datasets() -> tuple[list[int], list[int]]:
    """Returns a pair of lists."""
    return [1, 2], [3]


def iterable() -> tuple[Stream, Stream]:
    """Returns iterable-style datasets."""
    return Stream(), Stream()


def empty() -> tuple[TensorDataset, TensorDataset]:
    """The test split is empty."""
    x = torch.zeros(2, 3)
    y = torch.zeros(2, dtype=torch.int64)
    return TensorDataset(x, y), TensorDataset(x[:0], y[:0])


def ragged() -> tuple[Items, Items]:
    """Examples of different shapes within the train split."""
    return Items([(torch.zeros(3), 0), (torch.zeros(4), 1)]), Items([(torch.zeros(3), 0)])


def split_shapes() -> tuple[Items, Items]:
    """Train and test examples of different shapes."""
    return Items([(torch.zeros(3), 0)]), Items([(torch.zeros(4), 0)])


def float_labels() -> tuple[TensorDataset, TensorDataset]:
    """Labels that are floats."""
    x = torch.zeros(2, 3)
    y = torch.tensor([0.0, 1.0])
    return TensorDataset(x, y), TensorDataset(x, y)


def negative_labels() -> tuple[TensorDataset, TensorDataset]:
    """A label of -1 in the test split."""
    x = torch.zeros(2, 3)
    return TensorDataset(x, torch.tensor([0, 1])), TensorDataset(x, torch.tensor([1, -1]))


def not_pairs() -> tuple[Items, Items]:
    """Items that are triples."""
    return Items([(torch.zeros(3), 0, 0)]), Items([(torch.zeros(3), 0, 0)])


def lm_float_inputs() -> tuple[TensorDataset, TensorDataset]:
    """y shaped like x but x is float: neither classification nor LM."""
    x = torch.zeros(2, 5)
    y = torch.zeros(2, 5, dtype=torch.int64)
    return TensorDataset(x, y), TensorDataset(x, y)


def raises() -> tuple[TensorDataset, TensorDataset]:
    """The function itself fails."""
    raise RuntimeError("no data here")


class _Failing(Items):
    def __getitem__(self, index: int) -> Any:
        if index == 1:
            raise KeyError("item 1 is lost")
        return super().__getitem__(index)


def failing_item() -> tuple[Items, Items]:
    """``__getitem__`` raises for the second item."""
    return _Failing([(torch.zeros(3), 0), (torch.zeros(3), 1)]), Items([(torch.zeros(3), 0)])
