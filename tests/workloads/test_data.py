"""Dataset specs and loaders: small files in the real formats, written at test time."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ranger_ps.errors import UserError
from ranger_ps.workloads import file_formats
from ranger_ps.workloads.data import (
    CONTEXT_LENGTH,
    DATASETS,
    SYNTHETIC_DEFAULTS,
    Dataset,
    Normalize,
    load_dataset,
    parse_spec,
    shard_indices,
    text_minimum_length,
)
from ranger_ps.workloads.file_formats import FormatError

BYO = "tests.byo_datasets"


# --- digits and synthetic: bit for bit what they were ------------------------------------------------


@pytest.mark.timeout(30)
def test_digits_unchanged() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()  # the recipe before dataset specs existed
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(list(range(len(y))), test_size=0.2, random_state=0, stratify=bunch.target)
    data = load_dataset("digits")
    assert data.name == "digits" and data.num_classes == 10 and data.task == "classify" and data.vocabulary == ""
    assert data.x_train.shape == (1437, 64) and data.x_test.shape == (360, 64) and data.input_shape == (64,)
    assert torch.equal(data.x_train, x[idx_train]) and torch.equal(data.y_train, y[idx_train])
    assert torch.equal(data.x_test, x[idx_test]) and torch.equal(data.y_test, y[idx_test])
    assert data.prepare(data.x_train[:5]) is not None and torch.equal(data.prepare(data.x_train[:5]), x[idx_train][:5])
    assert DATASETS["digits"]().x_train.shape == (1437, 64)


def _old_synthetic() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(20_251_124)
    x = torch.randn(12_000, 8, generator=generator)
    hidden = torch.tanh(2.0 * (x @ (torch.randn(8, 16, generator=generator) * 0.5)))
    y = (hidden @ torch.randn(16, 5, generator=generator)).argmax(dim=1)
    return x, y


def test_synthetic_unchanged() -> None:
    x, y = _old_synthetic()
    for spec in ("synthetic", "synthetic:", "synthetic:features=8,classes=5,seed=20251124"):
        data = load_dataset(spec)
        assert data.name == "synthetic" and data.num_classes == 5 and data.task == "classify"
        assert torch.equal(data.x_train, x[:10_000]) and torch.equal(data.y_train, y[:10_000])
        assert torch.equal(data.x_test, x[10_000:]) and torch.equal(data.y_test, y[10_000:])
        assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert torch.equal(DATASETS["synthetic"]().x_train, x[:10_000])
    assert SYNTHETIC_DEFAULTS == {
        "features": 8, "classes": 5, "hidden": 16, "train": 10_000, "test": 2_000, "seed": 20_251_124,
    }  # fmt: skip


def test_synthetic_options() -> None:
    data = load_dataset("synthetic:features=32, classes=12,hidden=64,train=300,test=50,seed=7")
    assert data.name == "synthetic:features=32,classes=12,hidden=64,train=300,test=50,seed=7"
    assert data.x_train.shape == (300, 32) and data.x_test.shape == (50, 32) and data.num_classes == 12
    assert int(data.y_train.max()) < 12 and len(set(data.y_train.tolist())) > 3
    again = load_dataset("synthetic:seed=7,features=32,classes=12,hidden=64,train=300,test=50")
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_test, data.y_test)
    assert not torch.equal(
        load_dataset("synthetic:train=300,test=50,features=32,classes=12,hidden=64").x_train, data.x_train
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("synthetic:width=3", "unknown option 'width'"),
        ("synthetic:features=x", "option 'features' must be an integer"),
        ("synthetic:classes=1", "option 'classes' must be at least 2"),
        ("synthetic:train=0", "option 'train' must be at least 1"),
        ("synthetic:seed=-1", "option 'seed' must be at least 0"),
        ("synthetic:hidden", "option 'hidden' needs a value"),
        ("synthetic:test=5,test=6", "option 'test' is given twice"),
        ("synthetic:test=5,,train=3", "unknown option ''"),
    ],
)
def test_synthetic_option_errors(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        load_dataset(spec)
    assert str(info.value).startswith(spec)


# --- spec parsing ----------------------------------------------------------------------------------


def test_builtin_prefixes_win_over_plugin_syntax() -> None:
    assert parse_spec("text:data.txt").kind == "text"
    assert parse_spec("text:data").kind == "text"  # also a valid package.module:function
    assert parse_spec("mnist:raw").kind == "mnist" and parse_spec("cifar10:here").argument == "here"
    assert parse_spec("text:/a:b.txt").argument == "/a:b.txt"
    assert parse_spec(f"{BYO}:classify").kind == "plugin"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("imagenet", "unknown dataset 'imagenet'; choose from digits, digits-shifted, synthetic"),
        ("", "unknown dataset ''"),
        ("no such:thing", "unknown dataset"),
        ("digits:x", "digits takes no options"),
        ("cifar10", "expected cifar10:DIR"),
        ("mnist:", "expected mnist:DIR"),
        ("text:", "expected text:FILE"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_dataset(spec)


def test_shard_indices() -> None:
    assert shard_indices(10, 1, 3).tolist() == [1, 4, 7]
    assert shard_indices(10, 4, 3).tolist() == [1, 4, 7]


def test_dataset_constructed_positionally_keeps_defaults() -> None:
    x = torch.zeros(2, 3)
    y = torch.zeros(2, dtype=torch.int64)
    data = Dataset("d", x, y, x, y, 2)
    assert data.task == "classify" and data.vocabulary == "" and data.transform is None
    assert data.prepare(x) is x and data.input_shape == (3,)


# --- CIFAR-10 --------------------------------------------------------------------------------------


def _cifar_batch(n: int, seed: int) -> dict[bytes, Any]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"training batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }


def _write_cifar(directory: Path, protocol: int = 2, meta: bool = True) -> dict[str, dict[bytes, Any]]:
    directory.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": _cifar_batch(2, i) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(3, 9)
    for name, batch in batches.items():
        with (directory / name).open("wb") as file:
            pickle.dump(batch, file, protocol=protocol)
    if meta:
        names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
        with (directory / "batches.meta").open("wb") as file:
            pickle.dump({b"label_names": names, b"num_vis": 3072}, file, protocol=protocol)
    return batches


@pytest.mark.timeout(10)
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10(tmp_path: Path, protocol: int) -> None:
    batches = _write_cifar(tmp_path, protocol)
    data = load_dataset(f"cifar10:{tmp_path}")
    assert data.name == "cifar10" and data.num_classes == 10 and data.task == "classify"
    assert data.x_train.shape == (10, 3, 32, 32) and data.x_train.dtype == torch.uint8
    assert data.x_test.shape == (3, 3, 32, 32) and data.y_test.dtype == torch.int64 and data.input_shape == (3, 32, 32)
    first = batches["data_batch_1"][b"data"][0]
    assert np.array_equal(data.x_train[0].numpy(), first.reshape(3, 32, 32))  # channel-major rows: R, G, B planes
    assert np.array_equal(data.x_train[0, 1, 0].numpy(), first[1024:1056])  # green plane, first row
    assert data.y_train.tolist() == [label for i in range(1, 6) for label in batches[f"data_batch_{i}"][b"labels"]]
    assert data.y_test.tolist() == batches["test_batch"][b"labels"]
    prepared = data.prepare(data.x_train)
    assert prepared.dtype == torch.float32 and prepared.shape == (10, 3, 32, 32)
    assert torch.allclose(prepared.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(prepared.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    assert isinstance(data.transform, Normalize) and len(data.transform.mean) == 3
    expected = (data.x_test[:, 2].float() / 255 - data.transform.mean[2]) / data.transform.std[2]
    assert torch.allclose(data.prepare(data.x_test)[:, 2], expected, atol=1e-6)


@pytest.mark.timeout(10)
def test_cifar10_parent_directory_and_no_meta(tmp_path: Path) -> None:
    batches = _write_cifar(tmp_path / "cifar-10-batches-py", meta=False)
    data = load_dataset(f"cifar10:{tmp_path}")
    labels = [label for batch in batches.values() for label in batch[b"labels"]]
    assert data.num_classes == max(labels) + 1
    assert data.x_train.shape == (10, 3, 32, 32)


@pytest.mark.timeout(10)
def test_cifar10_missing_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"is not a directory; expected data_batch_1..data_batch_5 and test_batch"):
        load_dataset(f"cifar10:{tmp_path / 'nowhere'}")
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    spec = f"cifar10:{tmp_path}"
    expected = f"{spec}: expected data_batch_1..data_batch_5 and test_batch in {tmp_path} (the CIFAR-10 python version)"
    with pytest.raises(UserError) as info:
        load_dataset(spec)
    assert str(info.value) == expected


@pytest.mark.timeout(10)
def test_cifar10_truncated_and_malformed(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    spec = f"cifar10:{tmp_path}"
    raw = (tmp_path / "data_batch_2").read_bytes()
    (tmp_path / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match=r"data_batch_2 is (truncated|not a (safe numpy|valid) pickle)"):
        load_dataset(spec)
    (tmp_path / "data_batch_2").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="data_batch_2"):
        load_dataset(spec)
    bad = _cifar_batch(2, 2)
    bad[b"data"] = bad[b"data"][:, :100]
    with (tmp_path / "data_batch_2").open("wb") as file:
        pickle.dump(bad, file)
    with pytest.raises(UserError, match=r"'data' must be a uint8 array of shape \(N, 3072\)"):
        load_dataset(spec)
    bad = _cifar_batch(2, 2)
    bad[b"labels"] = [1]
    with (tmp_path / "data_batch_2").open("wb") as file:
        pickle.dump(bad, file)
    with pytest.raises(UserError, match="'labels' must be 2 integers"):
        load_dataset(spec)
    with (tmp_path / "data_batch_2").open("wb") as file:
        pickle.dump([1, 2, 3], file)
    with pytest.raises(UserError, match="holds a list, not a CIFAR-10 batch dict"):
        load_dataset(spec)


class _Evil:
    """Unpickling this runs a shell command, with a plain unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.timeout(10)
def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with (tmp_path / "test_batch").open("wb") as file:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, file, protocol=2)
    with pytest.raises(
        UserError, match=r"test_batch is not a safe numpy pickle: refusing to load global (posix|os)\.system"
    ):
        load_dataset(f"cifar10:{tmp_path}")
    assert not marker.exists()
    for module, name in (("builtins", "eval"), ("numpy", "load"), ("numpy.core.multiarray", "fromfile")):
        payload = f"c{module}\n{name}\n(tR.".encode()
        path = tmp_path / "payload"
        path.write_bytes(payload)
        with pytest.raises(FormatError, match=f"refusing to load global {module}.{name}"):
            file_formats.load_numpy_pickle(path)


@pytest.mark.timeout(10)
def test_restricted_unpickler_loads_plain_data_and_arrays(tmp_path: Path) -> None:
    value: dict[Any, Any] = {
        b"a": np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2],  # not contiguous: protocol 5 falls back
        "b": [np.int64(3), np.float32(1.5), (1, "x"), {2: b"y"}],
        "c": np.arange(4, dtype=">i4"),
    }
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}"
        with path.open("wb") as file:
            pickle.dump(value, file, protocol=protocol)
        loaded = file_formats.load_numpy_pickle(path)
        assert np.array_equal(loaded[b"a"], value[b"a"]) and np.array_equal(loaded["c"], value["c"])
        assert loaded["b"][0] == 3 and loaded["b"][2] == (1, "x") and loaded["b"][3] == {2: b"y"}
    with pytest.raises(FormatError, match="cannot read"):
        file_formats.load_numpy_pickle(tmp_path / "missing")


# --- MNIST -----------------------------------------------------------------------------------------


def _idx(array: np.ndarray[Any, Any]) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_mnist(directory: Path, compress: bool, train: int = 5, test: int = 3) -> dict[str, np.ndarray[Any, Any]]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([9] + [1] * (test - 1), dtype=np.uint8),
    }
    for name, array in arrays.items():
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(_idx(array)))
        else:
            (directory / name).write_bytes(_idx(array))
    return arrays


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("compress", "layout"), [(True, "."), (False, "."), (True, "MNIST/raw"), (False, "raw")])
def test_mnist(tmp_path: Path, compress: bool, layout: str) -> None:
    arrays = _write_mnist(tmp_path / layout, compress)
    data = load_dataset(f"mnist:{tmp_path}")
    assert data.name == "mnist" and data.task == "classify" and data.num_classes == 10
    assert (
        data.x_train.shape == (5, 1, 28, 28) and data.x_train.dtype == torch.uint8 and data.input_shape == (1, 28, 28)
    )
    assert data.x_test.shape == (3, 1, 28, 28) and data.y_train.dtype == torch.int64
    assert np.array_equal(data.x_train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert data.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist() and data.y_test.tolist() == [9, 1, 1]
    prepared = data.prepare(data.x_train)
    assert prepared.dtype == torch.float32 and prepared.shape == (5, 1, 28, 28)
    assert abs(float(prepared.mean())) < 1e-4 and abs(float(prepared.std(unbiased=False)) - 1) < 1e-4


@pytest.mark.timeout(10)
def test_mnist_errors(tmp_path: Path) -> None:
    spec = f"mnist:{tmp_path}"
    with pytest.raises(UserError, match=r"expected train-images-idx3-ubyte, .* \(each optionally \.gz\)"):
        load_dataset(spec)
    _write_mnist(tmp_path, compress=True)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(_idx(np.zeros(4, dtype=np.uint8))))
    with pytest.raises(UserError, match=r"has 5 images but .*train-labels-idx1-ubyte.gz has 4 labels"):
        load_dataset(spec)
    labels.write_bytes(gzip.compress(_idx(np.zeros(5, dtype=np.uint8)))[:-12])
    with pytest.raises(UserError, match=r"train-labels-idx1-ubyte.gz is (truncated|not a valid gzip file)"):
        load_dataset(spec)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    images.unlink()
    images.with_suffix("").write_bytes(_idx(np.zeros((3, 28, 28), dtype=np.uint8))[:-1])  # a plain file wins too
    labels.write_bytes(gzip.compress(_idx(np.zeros(5, dtype=np.uint8))))
    with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte is truncated: 2351 data bytes, the header"):
        load_dataset(spec)
    images.with_suffix("").write_bytes(b"\x08\x03\x00\x00")
    with pytest.raises(UserError, match="is not an IDX file"):
        load_dataset(spec)


def test_parse_idx() -> None:
    values = np.array([[1, -2, 300], [4, 5, -32768]], dtype=np.int16)
    parsed = file_formats.parse_idx(_idx(values), "x")
    assert parsed.dtype == np.dtype(np.int16) and np.array_equal(parsed, values)
    floats = np.linspace(0, 1, 6, dtype=np.float32)
    assert np.array_equal(file_formats.parse_idx(_idx(floats), "x"), floats)
    with pytest.raises(FormatError, match="unknown IDX type code 0x07"):
        file_formats.parse_idx(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "x")
    with pytest.raises(FormatError, match="truncated"):
        file_formats.parse_idx(b"\x00\x00\x08\x03\x00\x00", "x")
    with pytest.raises(FormatError, match="1 bytes after the data"):
        file_formats.parse_idx(_idx(values) + b"!", "x")
    with pytest.raises(FormatError, match="truncated: 0 data bytes"):
        file_formats.parse_idx(b"\x00\x00\x08\x01\xff\xff\xff\xff", "x")  # a huge declared size allocates nothing


# --- text ------------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_text(tmp_path: Path) -> None:
    text = "".join(f"line {i}: héllo wörld ✓\n" for i in range(200))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    data = load_dataset(f"text:{path}")
    assert data.name == "text" and data.task == "lm" and data.vocabulary == "".join(sorted(set(text)))
    assert data.num_classes == len(data.vocabulary) and data.input_shape == (CONTEXT_LENGTH,)
    split = len(text) - len(text) // 10
    assert data.x_train.shape == ((split - 1) // CONTEXT_LENGTH, CONTEXT_LENGTH)
    assert data.x_test.shape == ((len(text) - split - 1) // CONTEXT_LENGTH, CONTEXT_LENGTH)
    for t in (data.x_train, data.y_train, data.x_test, data.y_test):
        assert t.dtype == torch.int64

    def decode(ids: torch.Tensor) -> str:
        return "".join(data.vocabulary[i] for i in ids.tolist())

    assert decode(data.x_train[0]) == text[:CONTEXT_LENGTH] and decode(data.y_train[0]) == text[1 : CONTEXT_LENGTH + 1]
    assert decode(data.x_train[1]) == text[CONTEXT_LENGTH : 2 * CONTEXT_LENGTH]
    assert decode(data.x_test[0]) == text[split : split + CONTEXT_LENGTH]
    last = split + (len(data.y_test) - 1) * CONTEXT_LENGTH
    assert decode(data.y_test[-1]) == text[last + 1 : last + CONTEXT_LENGTH + 1]
    assert torch.equal(data.x_train[:, 1:], data.y_train[:, :-1])
    assert data.prepare(data.x_train[:2]) is not None and torch.equal(data.prepare(data.x_train[:2]), data.x_train[:2])


@pytest.mark.timeout(10)
def test_text_errors(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("a" * (text_minimum_length() - 1), encoding="utf-8")
    with pytest.raises(
        UserError, match=f"has {text_minimum_length() - 1} characters; at least {text_minimum_length()}"
    ):
        load_dataset(f"text:{path}")
    path.write_text("ab" * text_minimum_length(), encoding="utf-8")
    assert load_dataset(f"text:{path}").vocabulary == "ab"
    path.write_bytes(b"abc\xff" * 200)
    with pytest.raises(UserError, match=r"is not UTF-8 text \(byte 3"):
        load_dataset(f"text:{path}")
    with pytest.raises(UserError, match="expected a UTF-8 text file at"):
        load_dataset(f"text:{tmp_path / 'missing.txt'}")


def test_text_windows_and_encoding() -> None:
    ids, vocabulary = file_formats.encode_characters("banana\U0001f600")
    assert vocabulary == "abn\U0001f600" and ids.tolist() == [1, 0, 2, 0, 2, 0, 3]
    x, y = file_formats.text_windows(torch.arange(10), 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    x, y = file_formats.text_windows(torch.arange(3), 3)
    assert x.shape == (0, 3) and y.shape == (0, 3)


# --- bring your own --------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_byo_classify() -> None:
    data = load_dataset(f"{BYO}:classify")
    assert data.name == f"{BYO}:classify" and data.task == "classify" and data.num_classes == 4  # test has label 3
    assert data.x_train.shape == (5000, 6) and data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert torch.equal(data.y_train, torch.arange(5000) % 3) and data.y_test.tolist() == [0, 3, 1]
    assert torch.equal(data.prepare(data.x_test), data.x_test)
    data = load_dataset(f"{BYO}:classify_int_labels")
    assert data.x_train.shape == (2, 2, 2) and data.y_train.tolist() == [1, 4] and data.num_classes == 5


@pytest.mark.timeout(10)
def test_byo_uint8_images() -> None:
    data = load_dataset(f"{BYO}:uint8_images")
    assert data.x_train.dtype == torch.uint8 and data.input_shape == (3, 4, 4) and data.num_classes == 2
    prepared = data.prepare(data.x_train)
    assert prepared.dtype == torch.float32
    assert torch.allclose(prepared.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)


@pytest.mark.timeout(10)
def test_byo_language_model() -> None:
    data = load_dataset(f"{BYO}:language_model")
    assert data.task == "lm" and data.num_classes == 7 and data.input_shape == (9,)
    assert data.x_train.shape == (3, 9) and data.y_train.shape == (3, 9) and data.x_test.shape == (1, 9)
    assert data.x_train.dtype == torch.int64 and data.y_test.dtype == torch.int64
    assert torch.equal(data.x_train[:, 1:], data.y_train[:, :-1])


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("not_a_pair", r"must return a pair \(train, test\) of torch Datasets, got TensorDataset"),
        ("not_datasets", r"\(train\): expected a map-style torch.utils.data.Dataset, got list"),
        ("iterable", "expected a map-style torch.utils.data.Dataset, got Stream"),
        ("empty", r"\(test\): the dataset is empty"),
        ("ragged", r"\(train\): items have inconsistent shapes"),
        ("split_shapes", r"train examples are \(3,\) but test examples \(4,\)"),
        ("float_labels", "labels must be integers, got torch.float32"),
        ("negative_labels", r"a label is negative \(-1\)"),
        ("not_pairs", r"items must be \(x, y\) pairs, got tuple"),
        ("lm_float_inputs", "x must be token ids, not torch.float32"),
        ("raises", "calling it failed: RuntimeError: no data here"),
        ("failing_item", r"\(train\): reading it failed: KeyError: 'item 1 is lost'"),
        ("missing", "has no attribute 'missing'"),
    ],
)
def test_byo_errors(function: str, message: str) -> None:
    spec = f"{BYO}:{function}"
    with pytest.raises(UserError, match=message) as info:
        load_dataset(spec)
    assert repr(spec) in str(info.value)
