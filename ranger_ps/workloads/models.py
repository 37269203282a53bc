"""Models a worker can build by name, or bring-your-own models named ``package.module:function``.

Built-in models (the ``--model`` flag):

* ``mlp``: flatten, 128 hidden ReLU units, linear classifier; any input shape.
* ``cnn``: two conv3x3-ReLU(-maxpool) stages and a linear classifier, for images ``(C, H, W)``,
  ``(H, W)`` or a flat input whose size is a perfect square (digits: 64 features -> 1x8x8).
* ``vgg``: the VGG-style network of the project's origin, for 32x32 images ``(C, 32, 32)``.
* ``vgg-bn``: the same with BatchNorm after every convolution.
* ``charlm``: a small causal Transformer over token ids ``(T,)``; logits ``(B, T, V)``.

Anything else that looks like ``package.module:function`` is a bring-your-own model: the function
is called with no arguments and must return an :class:`torch.nn.Module` with at least one trainable
parameter. ``input_shape`` and ``num_classes`` are ignored for it, so the user's model must fit the
dataset itself.

Every model is fully determined by the global RNG: ``torch.manual_seed(s)`` before
:func:`build_model` gives bit-identical parameters, which is how workers that build their models
independently start from the same point.

Buffers that change while training (the running means and variances of BatchNorm and other
normalization layers) are not parameters: the workers hand them to the optimizer
(``Ranger(..., buffers=running_statistics(model))``), which keeps them consistent through the
shards (averaged like the updates), so ``vgg-bn`` and a bring-your-own model with BatchNorm train,
evaluate and checkpoint one set of statistics. Other buffers (masks, tables) stay each worker's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ranger_ps.errors import UserError
from ranger_ps.workloads.plugins import is_plugin_spec, load_plugin

ModelFactory = Callable[[tuple[int, ...], int], nn.Module]
"""A built-in model's factory: ``(input_shape, num_classes) -> model``."""

PLUGIN_FLAG = "--model"


def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A two-layer perceptron: flatten, 128 hidden ReLU units, linear classifier."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def _image_shape(model: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(C, H, W)`` for an image input given as ``(C, H, W)``, ``(H, W)`` or a flat perfect square."""
    if len(input_shape) == 3:
        c, h, w = input_shape
        shape = (c, h, w)
    elif len(input_shape) == 2:
        shape = (1, input_shape[0], input_shape[1])
    elif len(input_shape) == 1 and input_shape[0] > 0 and math.isqrt(input_shape[0]) ** 2 == input_shape[0]:
        side = math.isqrt(input_shape[0])
        shape = (1, side, side)
    else:
        raise UserError(
            f"--model {model} needs image inputs (C, H, W), (H, W) or a flat input whose size is a perfect square "
            f"(e.g. 64 -> 1x8x8); this dataset's input shape is {tuple(input_shape)}"
        )
    if min(shape) < 1:
        raise UserError(f"--model {model}: input shape {tuple(input_shape)} has an empty dimension")
    return shape


def _as_image(input_shape: tuple[int, ...], image: tuple[int, int, int]) -> list[nn.Module]:
    """The layers (if any) that turn a batch of ``input_shape`` into a batch of ``image``."""
    if tuple(input_shape) == image:
        return []
    if len(input_shape) == 2:  # (H, W): add the channel dimension
        return [nn.Unflatten(1, (1, input_shape[0]))]
    return [nn.Unflatten(1, image)]  # flat


def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A small convolutional network for small images.

    Two stages of conv3x3 (padding 1) and ReLU with 32 and 64 channels; each stage ends with a 2x2
    max-pool while both spatial sizes are at least 2 (8x8 -> 4x4 -> 2x2, 28x28 -> 14x14 -> 7x7,
    32x32 -> 16x16 -> 8x8); then flatten and one linear classifier. Accepts ``(C, H, W)``, ``(H, W)``
    (one channel) or a flat input whose size is a perfect square, reshaped inside the model to
    ``(1, side, side)`` (scikit-learn digits: 64 features -> 1x8x8).

    There is deliberately no BatchNorm: its running statistics are buffers, not parameters, so the
    parameter server would not synchronize them between workers.
    """
    c, h, w = _image_shape("cnn", input_shape)
    layers: list[nn.Module] = _as_image(input_shape, (c, h, w))
    channels = c
    for out in (32, 64):
        layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.ReLU()]
        if h >= 2 and w >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        channels = out
    layers += [nn.Flatten(), nn.Linear(channels * h * w, num_classes)]
    return nn.Sequential(*layers)


VGG_CHANNELS = (64, 128, 256, 256, 256)
"""Output channels of the five conv3x3-ReLU-maxpool2 stages of :func:`vgg`."""


def vgg(input_shape: tuple[int, ...], num_classes: int, *, batch_norm: bool = False) -> nn.Module:
    """The VGG-style network of the project's origin, for 32x32 images such as CIFAR-10's ``(3, 32, 32)``.

    Five stages of conv3x3 (padding 1), ReLU and 2x2 max-pool with 64, 128, 256, 256 and 256
    channels take 32x32 down to 1x1; a linear layer (256 -> ``num_classes``) classifies. Any channel
    count ``C`` is accepted as long as the images are 32x32 (``(C, 32, 32)``, or ``(32, 32)`` and a
    flat 1,024 for one channel); other shapes are a :class:`UserError`. With ``batch_norm`` (the
    ``vgg-bn`` model) every convolution is followed by BatchNorm (and has no bias of its own).
    """
    name = "vgg-bn" if batch_norm else "vgg"
    c, h, w = _image_shape(name, input_shape)
    if (h, w) != (32, 32):
        raise UserError(
            f"--model {name} needs 32x32 images, (C, 32, 32) such as CIFAR-10's (3, 32, 32); "
            f"this dataset's input shape is {tuple(input_shape)}"
        )
    layers: list[nn.Module] = _as_image(input_shape, (c, h, w))
    channels = c
    for out in VGG_CHANNELS:
        layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        channels = out
    layers += [nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def vgg_bn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """:func:`vgg` with BatchNorm after every convolution."""
    return vgg(input_shape, num_classes, batch_norm=True)


class CharLM(nn.Module):
    """A small causal Transformer language model over token ids.

    Token embedding plus learned positions, ``num_layers`` pre-norm
    :class:`torch.nn.TransformerEncoderLayer` blocks under a causal mask (position ``t`` sees
    positions ``<= t`` only), a final LayerNorm and a linear read-out to the vocabulary.

    Input: ``(B, T)`` integer token ids with ``T <= context``. Output: logits ``(B, T, vocab_size)``,
    the prediction of each next token; the loss is ``cross_entropy(logits.flatten(0, -2), y.flatten())``.
    Deterministic in eval mode, and in training mode too with the default ``dropout=0``.
    """

    def __init__(
        self,
        vocab_size: int,
        context: int,
        *,
        d_model: int = 128,
        num_heads: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 512,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Parameter(torch.randn(context, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model,
            num_heads,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, T, V)`` for token ids ``(B, T)``."""
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dim() != 2:
            raise UserError(
                f"--model charlm needs batches of integer token ids (B, T); got {tokens.dtype} of shape "
                f"{tuple(tokens.shape)} (is this a text dataset?)"
            )
        t = tokens.shape[1]
        if t > self.context:
            raise UserError(f"--model charlm was built for sequences of at most {self.context} tokens, got {t}")
        x = self.embed(tokens) + self.position[:t]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device, dtype=x.dtype)
        x = self.blocks(x, mask=mask, is_causal=True)
        logits: torch.Tensor = self.head(self.norm(x))
        return logits


def charlm(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A :class:`CharLM` for sequences of ``T`` token ids (``input_shape == (T,)``) over ``num_classes`` symbols.

    ``d_model`` 128, 4 heads, 2 layers, feed-forward 512, no dropout.
    """
    if len(input_shape) != 1 or input_shape[0] < 1:
        raise UserError(
            f"--model charlm needs sequences of token ids, input shape (T,); this dataset's is {tuple(input_shape)}"
        )
    if num_classes < 1:
        raise UserError(f"--model charlm needs a vocabulary of at least one symbol, got {num_classes}")
    return CharLM(num_classes, input_shape[0])


MODELS: dict[str, ModelFactory] = {"mlp": mlp, "cnn": cnn, "vgg": vgg, "vgg-bn": vgg_bn, "charlm": charlm}
"""The built-in models by ``--model`` name."""


def load_byo_model(spec: str) -> nn.Module:
    """Call the bring-your-own model function ``spec`` (``package.module:function``) with no arguments.

    It must return an :class:`torch.nn.Module` with at least one trainable parameter; anything else,
    and any exception the function raises, is a :class:`UserError` naming ``spec``.
    """
    factory = load_plugin(spec, PLUGIN_FLAG)
    try:
        model = factory()
    except Exception as exc:  # the user's code failed: report it as their error, in one line
        raise UserError(
            f"{PLUGIN_FLAG} {spec!r}: calling it with no arguments failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise UserError(f"{PLUGIN_FLAG} {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"{PLUGIN_FLAG} {spec!r} returned a {type(model).__name__} with no trainable parameters")
    return model


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a built-in model by name, or a bring-your-own one given as ``package.module:function``.

    ``input_shape`` is one example's shape (without the batch dimension) and ``num_classes`` the
    number of classes, or the vocabulary size for ``charlm``; both are ignored for a bring-your-own
    model. An unknown name is a :class:`UserError` listing the built-ins.
    """
    factory = MODELS.get(name)
    if factory is not None:
        return factory(tuple(input_shape), num_classes)
    if is_plugin_spec(name):
        return load_byo_model(name)
    raise UserError(
        f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}, or give your own as "
        "package.module:function (a function taking no arguments that returns a torch.nn.Module)"
    )


def check_cluster_buffers(model: nn.Module, outer: str, *, truncates: bool) -> None:
    """Refuse, before anything starts, a model whose running statistics these settings cannot keep
    consistent across workers (they need ``--outer mean`` and no shard truncation).

    Raises:
        UserError: the model has normalization statistics and the settings cannot average them.
    """
    from ranger_ps.optim import buffers_refusal, running_statistics

    if not running_statistics(model):
        return

    refusal = buffers_refusal(outer, truncates=truncates)
    if refusal is not None:
        raise UserError(f"the model has buffers (BatchNorm's running statistics): {refusal}")


def describe_model(model: nn.Module) -> str:
    """One line for logs: parameter count (trainable if not all) and size in MB (10^6 bytes)."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    size_mb = sum(p.numel() * p.element_size() for p in params) / 1e6
    counted = f"{total:,} parameters" if trainable == total else f"{total:,} parameters ({trainable:,} trainable)"
    return f"{type(model).__name__}: {counted}, {size_mb:.2f} MB"
