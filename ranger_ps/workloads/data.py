"""Datasets a worker can train on, named by a spec string (the ``--dataset`` flag).

Spec grammar (the part before the first ``:`` picks the loader; built-in names win over the
``package.module:function`` plugin syntax, so ``text:data.txt`` is the text loader)::

    digits                         scikit-learn's 8x8 digits (the default)
    digits-shifted                 the same digits shifted, dimmed and noisy on a 10x10 canvas (harder)
    synthetic                      a teacher network's labels on Gaussian inputs
    synthetic:key=value,...        the same with options: features, classes, hidden, train, test, seed
    cifar10:DIR                    the CIFAR-10 "python version" (DIR or DIR/cifar-10-batches-py)
    mnist:DIR                      MNIST IDX files, gzipped or not (DIR, DIR/MNIST/raw or DIR/raw)
    text:FILE                      character-level language modelling on a UTF-8 text file
    package.module:function        bring your own: function() -> (train, test) torch Datasets

Everything is held in memory as tensors. Images are stored as ``uint8`` and turned into model input
one batch at a time by :meth:`Dataset.prepare`; see ``docs/datasets.md``. Every problem with a spec,
a file or a plugin's return value is a :class:`~ranger_ps.errors.UserError` naming what was expected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ranger_ps.errors import UserError
from ranger_ps.workloads import file_formats
from ranger_ps.workloads.file_formats import FormatError
from ranger_ps.workloads.plugins import is_plugin_spec, load_plugin

CONTEXT_LENGTH = 64
"""Tokens per example for ``text:FILE``: x and y are (N, 64) windows, y shifted by one character."""

TEXT_TEST_DIVISOR = 10
"""The last ``1/10`` of a ``text:FILE``'s characters is its test split."""

PLUGIN_FLAG = "--dataset"

SPEC_FORMS = (
    "digits, digits-shifted, synthetic[:key=value,...], cifar10:DIR, mnist:DIR, text:FILE or package.module:function"
)
"""The accepted ``--dataset`` forms, for help texts and error messages."""

Transform = Callable[[torch.Tensor], torch.Tensor]
"""A per-batch transform from stored examples to model input."""


@dataclass(frozen=True)
class Normalize:
    """uint8 pixels to float32: scale to [0, 1], then subtract ``mean`` and divide by ``std``.

    With one value each, the whole example is one channel; with ``C`` values, dimension 1 of the
    batch (``(B, C, H, W)``) holds the channels.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize a batch of stored examples (on whatever device it is)."""
        out = x.to(torch.float32) / 255.0
        if len(self.mean) == 1:
            return (out - self.mean[0]) / self.std[0]
        shape = (1, len(self.mean)) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(shape)
        return (out - mean) / std


def pixel_normalization(images: torch.Tensor, chunk: int = 4096) -> Normalize:
    """The :class:`Normalize` that gives ``images`` (uint8) zero mean and unit variance.

    Per channel for ``(N, C, H, W)`` images (dimension 1), one channel for any other shape. Exact:
    a 256-bin histogram per channel, ``chunk`` examples at a time, so no float copy is ever made.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"pixel_normalization needs uint8 images, not {images.dtype}")
    channels = images.shape[1] if images.dim() >= 4 else 1
    counts = torch.zeros(channels, 256, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk].reshape(min(chunk, len(images) - start), channels, -1)
        for c in range(channels):
            counts[c] += torch.bincount(part[:, c].reshape(-1), minlength=256).to(torch.float64)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    total = counts.sum(dim=1).clamp(min=1.0)
    mean = (counts * values).sum(dim=1) / total
    var = ((counts * (values - mean[:, None]) ** 2).sum(dim=1) / total).clamp(min=0.0)
    std = torch.where(var.sqrt() > 1e-6, var.sqrt(), torch.ones_like(var))
    return Normalize(tuple(float(m) for m in mean), tuple(float(s) for s in std))


@dataclass(frozen=True)
class Dataset:
    """A dataset held in memory as tensors, with a fixed train/test split.

    Attributes:
        name: what reports call it.
        x_train, x_test: the stored examples; float32 features, uint8 images ``(N, C, H, W)`` or
            int64 token ids ``(N, T)``. Pass a batch through :meth:`prepare` before the model.
        y_train, y_test: int64 class labels ``(N,)`` (task ``classify``) or next-token ids ``(N, T)``
            (task ``lm``).
        num_classes: the number of classes, or the vocabulary size for ``lm``.
        task: ``"classify"`` or ``"lm"`` (per-position next-token prediction).
        vocabulary: for ``text:FILE``, the characters (index = token id); empty otherwise.
        transform: applied to each batch by :meth:`prepare`; ``None`` means identity.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    task: str = "classify"
    vocabulary: str = ""
    transform: Transform | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one stored example (e.g. ``(3, 32, 32)`` for CIFAR-10, ``(64,)`` for text)."""
        return tuple(self.x_train.shape[1:])

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The model input for a batch of stored examples (move it to the device first).

        uint8 images become normalized float32; float features and token ids pass through unchanged.
        """
        return x if self.transform is None else self.transform(x)


# --- spec parsing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed ``--dataset`` value: which loader, and the text after the first colon."""

    kind: str
    """A built-in name (a key of :data:`LOADERS`) or ``"plugin"``."""
    argument: str
    """What follows the first ``:`` (empty when there is none)."""
    text: str
    """The spec as given, for messages."""
    has_argument: bool = False
    """Whether the spec had a ``:`` at all."""


def parse_spec(spec: str) -> DatasetSpec:
    """Split a ``--dataset`` value into its loader and argument, without reading anything.

    Raises:
        UserError: an unknown name, a built-in that needs an argument without one, or one that takes
            none with one.
    """
    prefix, colon, argument = spec.partition(":")
    if prefix in BUILTIN_PREFIXES:
        parsed = DatasetSpec(prefix, argument, spec, bool(colon))
        if prefix in ("digits", "digits-shifted") and colon:
            raise UserError(f"{spec}: {prefix} takes no options")
        if prefix in ("cifar10", "mnist") and not argument:
            raise UserError(f"{spec}: expected {prefix}:DIR, a directory with the {prefix} files")
        if prefix == "text" and not argument:
            raise UserError(f"{spec}: expected text:FILE, a UTF-8 text file")
        return parsed
    if is_plugin_spec(spec):
        return DatasetSpec("plugin", spec, spec, True)
    raise UserError(f"unknown dataset {spec!r}; choose from {SPEC_FORMS}")


# --- digits and synthetic ----------------------------------------------------------------------------


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


SHIFTED_CANVAS, SHIFTED_NOISE, SHIFTED_COPIES, SHIFTED_SEED = 10, 0.2, 4, 12345


def _digits_shifted() -> Dataset:
    """A harder task from the same digits: each image at a random offset (0-2 pixels each way) on a
    10x10 canvas, at a random contrast in [0.5, 1], with Gaussian pixel noise of std 0.2, in 4
    independent copies of every training and every test image (fixed seed). Dense training of the MLP
    plateaus near 78% (docs/convergence.md), so what sparse pushes cost shows.
    """
    base = _digits()
    generator = torch.Generator().manual_seed(SHIFTED_SEED)
    pad = SHIFTED_CANVAS - 8

    def make(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(y)
        images = x.view(n, 8, 8)
        copies = []
        for _ in range(SHIFTED_COPIES):
            dx = torch.randint(0, pad + 1, (n,), generator=generator)
            dy = torch.randint(0, pad + 1, (n,), generator=generator)
            contrast = 0.5 + 0.5 * torch.rand(n, generator=generator)
            canvas = torch.zeros(n, SHIFTED_CANVAS, SHIFTED_CANVAS)
            for ox in range(pad + 1):
                for oy in range(pad + 1):
                    at = (dx == ox) & (dy == oy)
                    canvas[at, oy : oy + 8, ox : ox + 8] = images[at] * contrast[at, None, None]
            canvas += SHIFTED_NOISE * torch.randn(n, SHIFTED_CANVAS, SHIFTED_CANVAS, generator=generator)
            copies.append(canvas.view(n, -1))
        return torch.cat(copies), y.repeat(SHIFTED_COPIES)

    x_train, y_train = make(base.x_train, base.y_train)
    x_test, y_test = make(base.x_test, base.y_test)
    order = torch.randperm(len(y_train), generator=generator)  # workers' every-n-th shards mix the copies
    return Dataset("digits-shifted", x_train[order].contiguous(), y_train[order].contiguous(), x_test, y_test, 10)


SYNTHETIC_DEFAULTS: dict[str, int] = {
    "features": 8,
    "classes": 5,
    "hidden": 16,
    "train": 10_000,
    "test": 2_000,
    "seed": 20_251_124,
}
"""The options of ``synthetic:key=value,...`` and their defaults (plain ``synthetic``)."""

_SYNTHETIC_MINIMUM = {"features": 1, "classes": 2, "hidden": 1, "train": 1, "test": 1, "seed": 0}


def teacher_dataset(
    name: str = "synthetic",
    *,
    features: int = 8,
    classes: int = 5,
    hidden: int = 16,
    train: int = 10_000,
    test: int = 2_000,
    seed: int = 20_251_124,
) -> Dataset:
    """A teacher network's labels on Gaussian inputs; the defaults are plain ``synthetic``.

    The teacher is one tanh layer of ``hidden`` units with a random linear read-out to ``classes``
    logits; labels are its argmax. Fully determined by ``seed``, so every worker and run sees the same
    data; nothing is downloaded.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(train + test, features, generator=generator)
    activations = torch.tanh(2.0 * (x @ (torch.randn(features, hidden, generator=generator) * 0.5)))
    y = (activations @ torch.randn(hidden, classes, generator=generator)).argmax(dim=1)
    return Dataset(name, x[:train], y[:train], x[train:], y[train:], classes)


def _synthetic() -> Dataset:
    """A teacher network's labels on Gaussian inputs: 8 features, 5 classes, 10,000 + 2,000 examples.

    Harder than digits for the same MLP (dense SGD reaches about 0.86 in 10 epochs, against 0.97 on
    digits), so it separates settings that digits cannot. The teacher is one tanh layer of 16 units
    with a random linear read-out; labels are its argmax. Fully determined by a fixed seed, so every
    worker and run sees the same data; nothing is downloaded.
    """
    return teacher_dataset("synthetic", **SYNTHETIC_DEFAULTS)


def synthetic_options(spec: str, argument: str) -> dict[str, int]:
    """The options of ``synthetic:key=value,...`` merged over :data:`SYNTHETIC_DEFAULTS`.

    Raises:
        UserError: an unknown or repeated key, a value that is not an integer, or one out of range;
            the message names the key.
    """
    options = dict(SYNTHETIC_DEFAULTS)
    seen: set[str] = set()
    known = ", ".join(SYNTHETIC_DEFAULTS)
    for item in argument.split(",") if argument.strip() else []:
        key, equals, value = (part.strip() for part in item.partition("="))
        if key not in SYNTHETIC_DEFAULTS:
            raise UserError(f"{spec}: unknown option {key!r}; options are {known} (as key=value,...)")
        if not equals:
            raise UserError(f"{spec}: option {key!r} needs a value ({key}=N)")
        if key in seen:
            raise UserError(f"{spec}: option {key!r} is given twice")
        seen.add(key)
        try:
            number = int(value)
        except ValueError:
            raise UserError(f"{spec}: option {key!r} must be an integer, not {value!r}") from None
        if number < _SYNTHETIC_MINIMUM[key] or (key == "seed" and number >= 2**63):
            raise UserError(f"{spec}: option {key!r} must be at least {_SYNTHETIC_MINIMUM[key]}, not {number}")
        options[key] = number
    return options


def _synthetic_spec(spec: DatasetSpec) -> Dataset:
    options = synthetic_options(spec.text, spec.argument)
    changed = [f"{key}={value}" for key, value in options.items() if value != SYNTHETIC_DEFAULTS[key]]
    name = "synthetic:" + ",".join(changed) if changed else "synthetic"
    return teacher_dataset(name, **options)


# --- CIFAR-10 ----------------------------------------------------------------------------------------

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_SUBDIRECTORY = "cifar-10-batches-py"


def _field(record: dict[Any, Any], key: str) -> Any:
    """``record[b"key"]`` (a Python 2 pickle) or ``record["key"]`` (one written by Python 3)."""
    if key.encode() in record:
        return record[key.encode()]
    return record.get(key)


def _cifar_batch(path: Path) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """One CIFAR-10 batch file: images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64."""
    record = file_formats.load_numpy_pickle(path)
    if not isinstance(record, dict):
        raise FormatError(f"{path} holds a {type(record).__name__}, not a CIFAR-10 batch dict")
    data, labels = _field(record, "data"), _field(record, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"shape {data.shape}, {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise FormatError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {got}")
    try:
        label_array = np.asarray(labels)
    except (TypeError, ValueError):
        label_array = np.asarray([])
    if label_array.ndim != 1 or not np.issubdtype(label_array.dtype, np.integer) or len(label_array) != len(data):
        raise FormatError(f"{path}: 'labels' must be {len(data)} integers, one per image")
    if len(label_array) and label_array.min() < 0:
        raise FormatError(f"{path}: 'labels' has a negative label {label_array.min()}")
    return data.reshape(-1, 3, 32, 32), label_array.astype(np.int64)


def _cifar10(spec: DatasetSpec) -> Dataset:
    """CIFAR-10 from its python-version directory (or the directory that holds it)."""
    root = Path(spec.argument).expanduser()
    expected = f"expected data_batch_1..data_batch_5 and test_batch in {root} (the CIFAR-10 python version)"
    if not root.is_dir():
        raise UserError(f"{spec.text}: {root} is not a directory; {expected}")
    names = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    found = [d for d in (root, root / CIFAR10_SUBDIRECTORY) if all((d / n).is_file() for n in names)]
    if not found:
        raise UserError(f"{spec.text}: {expected}")
    directory = found[0]
    try:
        train = [_cifar_batch(directory / n) for n in CIFAR10_TRAIN_FILES]
        x_test, y_test = _cifar_batch(directory / CIFAR10_TEST_FILE)
        num_classes = max(int(y.max(initial=-1)) for y in (*(y for _, y in train), y_test)) + 1
        meta_path = directory / "batches.meta"
        if meta_path.is_file():
            meta = file_formats.load_numpy_pickle(meta_path)
            names_field = _field(meta, "label_names") if isinstance(meta, dict) else None
            if not isinstance(names_field, list):
                raise FormatError(f"{meta_path}: expected a dict with a 'label_names' list")
            if num_classes > len(names_field):
                raise FormatError(f"labels go up to {num_classes - 1} but {meta_path} names {len(names_field)}")
            num_classes = len(names_field)
    except FormatError as exc:
        raise UserError(f"{spec.text}: {exc}") from None
    x_train = torch.from_numpy(np.concatenate([x for x, _ in train]))
    y_train = torch.from_numpy(np.concatenate([y for _, y in train]))
    return Dataset(
        "cifar10",
        x_train,
        y_train,
        torch.from_numpy(np.require(x_test, requirements=["C", "W"])),
        torch.from_numpy(y_test),
        max(num_classes, 1),
        transform=pixel_normalization(x_train),
    )


# --- MNIST -----------------------------------------------------------------------------------------

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""The four IDX files of ``mnist:DIR``; each may also be gzipped as ``NAME.gz``."""


def _find_mnist_files(root: Path) -> dict[str, Path] | None:
    for directory in (root, root / "MNIST" / "raw", root / "raw"):
        paths: dict[str, Path] = {}
        for role, stem in MNIST_FILES.items():
            candidates = [p for p in (directory / stem, directory / f"{stem}.gz") if p.is_file()]
            if not candidates:
                break
            paths[role] = candidates[0]
        else:
            return paths
    return None


def _mnist_split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = file_formats.read_idx(images_path)
    labels = file_formats.read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise FormatError(f"{images_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise FormatError(f"{labels_path}: expected integer labels (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise FormatError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if len(labels) and labels.min() < 0:
        raise FormatError(f"{labels_path} has a negative label {labels.min()}")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _mnist(spec: DatasetSpec) -> Dataset:
    """MNIST (or any dataset in its four-IDX-file layout, e.g. Fashion-MNIST): images ``(N, 1, H, W)``."""
    root = Path(spec.argument).expanduser()
    names = ", ".join(MNIST_FILES.values())
    expected = f"expected {names} (each optionally .gz) in {root} or {root / 'MNIST' / 'raw'}"
    if not root.is_dir():
        raise UserError(f"{spec.text}: {root} is not a directory; {expected}")
    paths = _find_mnist_files(root)
    if paths is None:
        raise UserError(f"{spec.text}: {expected}")
    try:
        x_train, y_train = _mnist_split(paths["train_images"], paths["train_labels"])
        x_test, y_test = _mnist_split(paths["test_images"], paths["test_labels"])
        if x_train.shape[1:] != x_test.shape[1:]:
            raise FormatError(f"train images are {tuple(x_train.shape[2:])} but test images {tuple(x_test.shape[2:])}")
    except FormatError as exc:
        raise UserError(f"{spec.text}: {exc}") from None
    num_classes = max(int(y_train.max()) if len(y_train) else 0, int(y_test.max()) if len(y_test) else 0) + 1
    return Dataset("mnist", x_train, y_train, x_test, y_test, num_classes, transform=pixel_normalization(x_train))


# --- text ------------------------------------------------------------------------------------------


def text_minimum_length(context: int = CONTEXT_LENGTH) -> int:
    """The fewest characters a ``text:FILE`` needs: one window (``context + 1`` characters) in each split."""
    return (context + 1) * TEXT_TEST_DIVISOR


def _text(spec: DatasetSpec) -> Dataset:
    """Character-level language modelling: non-overlapping windows of :data:`CONTEXT_LENGTH` tokens."""
    path = Path(spec.argument).expanduser()
    if not path.is_file():
        raise UserError(f"{spec.text}: expected a UTF-8 text file at {path}")
    try:
        text = file_formats.read_text(path)
    except FormatError as exc:
        raise UserError(f"{spec.text}: {exc}") from None
    minimum = text_minimum_length()
    if len(text) < minimum:
        raise UserError(
            f"{spec.text}: {path} has {len(text)} characters; at least {minimum} are needed "
            f"(a window of {CONTEXT_LENGTH + 1} in the test split, its last 1/{TEXT_TEST_DIVISOR})"
        )
    ids, vocabulary = file_formats.encode_characters(text)
    split = len(ids) - len(ids) // TEXT_TEST_DIVISOR
    x_train, y_train = file_formats.text_windows(ids[:split], CONTEXT_LENGTH)
    x_test, y_test = file_formats.text_windows(ids[split:], CONTEXT_LENGTH)
    return Dataset("text", x_train, y_train, x_test, y_test, len(vocabulary), task="lm", vocabulary=vocabulary)


# --- bring your own --------------------------------------------------------------------------------

_PLUGIN_BATCH = 4096


def _is_integer_tensor(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _as_tensor(value: Any) -> torch.Tensor | None:
    """A tensor for a tensor, numpy array or numpy scalar; ``None`` for anything else."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray | np.generic):
        return torch.as_tensor(value)
    return None


def _item_task(where: str, item: Any) -> str:
    """``"classify"`` or ``"lm"`` from a split's first item; a :class:`UserError` for anything else."""
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise UserError(f"{where}: items must be (x, y) pairs, got {type(item).__name__}")
    x, y = (_as_tensor(v) for v in item)
    if x is None:
        raise UserError(f"{where}: x must be a tensor, got {type(item[0]).__name__}")
    if isinstance(item[1], bool) or (y is not None and y.dtype == torch.bool):
        raise UserError(f"{where}: labels must be integers, got a bool")
    if isinstance(item[1], int):
        return "classify"
    if y is None:
        raise UserError(f"{where}: labels must be integers, got {type(item[1]).__name__}")
    if not _is_integer_tensor(y):
        raise UserError(f"{where}: labels must be integers, got {y.dtype}")
    if y.dim() == 0:
        return "classify"
    if y.shape == x.shape:
        if not _is_integer_tensor(x):
            raise UserError(f"{where}: y shaped like x means language modelling, so x must be token ids, not {x.dtype}")
        return "lm"
    raise UserError(
        f"{where}: y must be an integer label, or integer token ids shaped like x {tuple(x.shape)}, "
        f"got shape {tuple(y.shape)}"
    )


def _materialize(where: str, part: Any) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Read a map-style dataset into ``(x, y, task)`` tensors, a large batch at a time."""
    if isinstance(part, torch.utils.data.IterableDataset) or not isinstance(part, torch.utils.data.Dataset):
        raise UserError(f"{where}: expected a map-style torch.utils.data.Dataset, got {type(part).__name__}")
    try:
        n = len(part)  # type: ignore[arg-type]
    except TypeError:
        raise UserError(f"{where}: the dataset has no length (map-style datasets define __len__)") from None
    if n == 0:
        raise UserError(f"{where}: the dataset is empty")
    try:
        first = part[0]
    except Exception as exc:
        raise UserError(f"{where}: reading it failed: {type(exc).__name__}: {exc}") from exc
    task = _item_task(where, first)
    loader = torch.utils.data.DataLoader(part, batch_size=_PLUGIN_BATCH, shuffle=False, num_workers=0)
    x_all: torch.Tensor | None = None
    y_all: torch.Tensor | None = None
    start = 0
    try:
        for batch in loader:
            if not isinstance(batch, list | tuple) or len(batch) != 2:
                raise UserError(f"{where}: items must be (x, y) pairs")
            x, y = batch
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise UserError(f"{where}: items must be (x, y) pairs of tensors and integer labels")
            if not _is_integer_tensor(y):
                raise UserError(f"{where}: labels must be integers, got {y.dtype}")
            expected_y = x.shape if task == "lm" else x.shape[:1]
            if y.shape != expected_y:
                raise UserError(
                    f"{where}: items have inconsistent shapes (y {tuple(y.shape[1:])}, x {tuple(x.shape[1:])})"
                )
            if x_all is None or y_all is None:
                x_dtype = torch.float32 if x.is_floating_point() else (torch.int64 if task == "lm" else x.dtype)
                x_all = torch.empty((n, *x.shape[1:]), dtype=x_dtype)
                y_all = torch.empty((n, *y.shape[1:]), dtype=torch.int64)
            if x.shape[1:] != x_all.shape[1:]:
                raise UserError(
                    f"{where}: items have inconsistent shapes: x {tuple(x_all.shape[1:])} and {tuple(x.shape[1:])}"
                )
            if start + len(x) > n:
                raise UserError(f"{where}: the dataset yields more than its __len__ of {n} items")
            x_all[start : start + len(x)] = x
            y_all[start : start + len(y)] = y
            start += len(x)
    except UserError:
        raise
    except RuntimeError as exc:
        if "equal size" in str(exc) or "stack expects" in str(exc):
            raise UserError(f"{where}: items have inconsistent shapes ({exc})") from None
        raise UserError(f"{where}: reading it failed: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # the user's __getitem__, or items default_collate cannot batch
        raise UserError(f"{where}: reading it failed: {type(exc).__name__}: {exc}") from exc
    if x_all is None or y_all is None or start != n:
        raise UserError(f"{where}: the dataset yields {start} items, not its __len__ of {n}")
    return x_all, y_all, task


def _plugin(spec: DatasetSpec) -> Dataset:
    """A bring-your-own dataset: ``function()`` returns ``(train, test)`` torch Datasets of ``(x, y)``."""
    where = f"{PLUGIN_FLAG} {spec.text!r}"
    factory = load_plugin(spec.text, PLUGIN_FLAG)
    try:
        result = factory()
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{where}: calling it failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, tuple | list) or len(result) != 2:
        raise UserError(f"{where}: must return a pair (train, test) of torch Datasets, got {type(result).__name__}")
    x_train, y_train, task_train = _materialize(f"{where} (train)", result[0])
    x_test, y_test, task_test = _materialize(f"{where} (test)", result[1])
    if task_train != task_test:
        raise UserError(f"{where}: the train split is {task_train} but the test split is {task_test}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise UserError(
            f"{where}: train examples are {tuple(x_train.shape[1:])} but test examples {tuple(x_test.shape[1:])}"
        )
    if x_train.dtype != x_test.dtype:
        raise UserError(f"{where}: train examples are {x_train.dtype} but test examples {x_test.dtype}")
    tensors = (x_train, y_train, x_test, y_test) if task_train == "lm" else (y_train, y_test)
    lowest = min(int(t.min()) for t in tensors)
    if lowest < 0:
        what = "token id" if task_train == "lm" else "label"
        raise UserError(f"{where}: a {what} is negative ({lowest})")
    num_classes = max(int(t.max()) for t in tensors) + 1
    transform = pixel_normalization(x_train) if x_train.dtype == torch.uint8 and task_train == "classify" else None
    return Dataset(spec.text, x_train, y_train, x_test, y_test, num_classes, task=task_train, transform=transform)


# --- registry --------------------------------------------------------------------------------------

DATASETS: dict[str, Callable[[], Dataset]] = {
    "digits": _digits,
    "digits-shifted": _digits_shifted,
    "synthetic": _synthetic,
}
"""The named datasets that need no argument (the ``ranger-ps convergence`` study runs these)."""

LOADERS: dict[str, Callable[[DatasetSpec], Dataset]] = {
    "digits": lambda spec: _digits(),
    "digits-shifted": lambda spec: _digits_shifted(),
    "synthetic": _synthetic_spec,
    "cifar10": _cifar10,
    "mnist": _mnist,
    "text": _text,
    "plugin": _plugin,
}
"""Loaders by :attr:`DatasetSpec.kind`; every key but ``plugin`` is a built-in spec prefix."""

BUILTIN_PREFIXES = tuple(name for name in LOADERS if name != "plugin")


def load_dataset(spec: str) -> Dataset:
    """Load the dataset a ``--dataset`` spec names (see the module docstring for the grammar).

    Raises:
        UserError: an unknown spec, a missing or malformed file, or a plugin that breaks its contract.
    """
    parsed = parse_spec(spec)
    if parsed.kind == "synthetic" and not parsed.has_argument:
        return _synthetic()
    return LOADERS[parsed.kind](parsed)


def shard_indices(num_examples: int, worker_index: int, num_workers: int) -> torch.Tensor:
    """The training examples this worker owns: every ``num_workers``-th, from ``worker_index``."""
    return torch.arange(worker_index % num_workers, num_examples, num_workers)
