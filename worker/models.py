"""Models a worker can build by name."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from ranger_ps.errors import UserError


def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A two-layer perceptron: flatten, 128 hidden ReLU units, linear classifier."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {"mlp": mlp}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a model by name; an unknown name is a :class:`UserError` listing the known ones."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}") from None
    return factory(input_shape, num_classes)
