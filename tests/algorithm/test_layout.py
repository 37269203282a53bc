"""Tests for ranger_ps.algorithm.layout: parameters cut into blocks, fingerprints, wire round trip."""

from __future__ import annotations

import pytest
import torch

from ranger_ps.algorithm.layout import (
    DEFAULT_BLOCK_SIZE,
    MAX_BLOCK_SIZE,
    Block,
    Layout,
    ParamInfo,
    is_positional_name,
)
from ranger_ps.wire._proto import ranger_ps_pb2 as pb
from ranger_ps.wire.messages import layout_from_proto, layout_to_proto


def _layout(block_size: int = 4) -> Layout:
    return Layout(
        (
            ParamInfo("w1", (3, 5), "float32"),  # 15 elements
            ParamInfo("b1", (4,), "float32"),  # exactly one block of 4
            ParamInfo("empty", (0, 7), "float32"),
            ParamInfo("w2", (2, 2, 3), "float16"),  # 12 elements
            ParamInfo("scalar", (), "float64"),  # 1 element
            ParamInfo("b2", (9,), "bfloat16"),
        ),
        block_size,
    )


def _check_blocks(layout: Layout) -> None:
    blocks = layout.blocks
    assert [b.block_id for b in blocks] == list(range(len(blocks)))
    assert layout.num_blocks == len(blocks)
    covered: dict[int, list[tuple[int, int]]] = {}
    last_param = -1
    for block in blocks:
        param = layout.params[block.param_index]
        assert 1 <= block.numel <= layout.block_size
        # A block never spans two parameters: it lies inside its own parameter.
        assert 0 <= block.offset
        assert block.offset + block.numel <= param.numel
        assert block.dtype == param.dtype
        assert block.itemsize == param.itemsize
        assert block.nbytes == block.numel * param.itemsize
        # Blocks come in parameter order.
        assert block.param_index >= last_param
        last_param = block.param_index
        covered.setdefault(block.param_index, []).append((block.offset, block.numel))
    for index, param in enumerate(layout.params):
        runs = covered.get(index, [])
        if param.numel == 0:
            assert runs == []
            continue
        # Consecutive, in order, no gap or overlap: every element exactly once.
        position = 0
        for offset, numel in runs:
            assert offset == position
            position += numel
        assert position == param.numel
        # Only the last block of a parameter may be short.
        assert all(numel == layout.block_size for _, numel in runs[:-1])
    assert sum(b.numel for b in blocks) == layout.numel
    assert sum(b.nbytes for b in blocks) == layout.nbytes


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 5, 7, 15, 16, 100])
def test_blocks_partition_every_parameter(block_size: int) -> None:
    _check_blocks(_layout(block_size))


def test_blocks_explicit() -> None:
    layout = Layout((ParamInfo("a", (5,), "float32"), ParamInfo("b", (3,), "float64")), block_size=2)
    assert layout.blocks == (
        Block(0, 0, 0, 2, "float32", 4),
        Block(1, 0, 2, 2, "float32", 4),
        Block(2, 0, 4, 1, "float32", 4),
        Block(3, 1, 0, 2, "float64", 8),
        Block(4, 1, 2, 1, "float64", 8),
    )
    assert layout.numel == 8
    assert layout.nbytes == 5 * 4 + 3 * 8


def test_block_never_spans_parameters_even_when_sizes_would_fit() -> None:
    # 3 + 3 elements with block_size 4: a packed cut would be [4, 2]; per-parameter gives [3, 3].
    layout = Layout((ParamInfo("a", (3,), "float32"), ParamInfo("b", (3,), "float32")), block_size=4)
    assert [(b.param_index, b.offset, b.numel) for b in layout.blocks] == [(0, 0, 3), (1, 0, 3)]


def test_empty_parameters_give_no_blocks() -> None:
    layout = Layout(
        (ParamInfo("a", (0,), "float32"), ParamInfo("b", (4, 0), "float16"), ParamInfo("c", (2,), "float32")),
        block_size=8,
    )
    assert len(layout.blocks) == 1
    assert layout.blocks[0].param_index == 2
    assert layout.blocks[0].block_id == 0
    assert Layout((ParamInfo("z", (0,), "float32"),)).blocks == ()
    assert Layout(()).blocks == ()
    assert Layout(()).numel == 0


def test_scalar_parameter_is_one_element() -> None:
    layout = Layout((ParamInfo("s", (), "float32"),), block_size=1)
    assert layout.blocks == (Block(0, 0, 0, 1, "float32", 4),)


def test_default_block_size() -> None:
    layout = Layout((ParamInfo("w", (DEFAULT_BLOCK_SIZE + 1,), "float32"),))
    assert layout.block_size == DEFAULT_BLOCK_SIZE
    assert [b.numel for b in layout.blocks] == [DEFAULT_BLOCK_SIZE, 1]


def test_from_named_tensors() -> None:
    named = [
        ("w", torch.zeros(3, 4)),
        ("h", torch.zeros(2, dtype=torch.float16)),
        ("bf", torch.zeros(1, 1, dtype=torch.bfloat16)),
        ("d", torch.zeros((), dtype=torch.float64)),
    ]
    layout = Layout.from_named_tensors(named, block_size=5)
    assert layout.params == (
        ParamInfo("w", (3, 4), "float32"),
        ParamInfo("h", (2,), "float16"),
        ParamInfo("bf", (1, 1), "bfloat16"),
        ParamInfo("d", (), "float64"),
    )
    assert layout.block_size == 5
    assert layout.params[0].torch_dtype == torch.float32
    assert layout.params[2].torch_dtype == torch.bfloat16
    assert layout.params[3].itemsize == 8


def test_from_named_tensors_rejects_unsupported_dtype() -> None:
    with pytest.raises(ValueError):
        Layout.from_named_tensors([("i", torch.zeros(3, dtype=torch.int64))])


def test_from_named_parameters_of_a_module() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    layout = Layout.from_named_tensors(model.named_parameters(), block_size=5)
    assert [p.name for p in layout.params] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert layout.numel == sum(p.numel() for p in model.parameters())
    _check_blocks(layout)


# --- fingerprint ---------------------------------------------------------------------------


def test_fingerprint_is_stable() -> None:
    a = _layout()
    first = a.fingerprint
    assert a.fingerprint == first
    assert _layout().fingerprint == first
    assert isinstance(first, str)
    assert len(first) == 16
    int(first, 16)  # hexadecimal


def test_fingerprint_is_a_known_value() -> None:
    # Pin the canonical encoding: changing it breaks compatibility with running clusters.
    # A fresh process (other workers, servers, a restarted cluster) must compute the same value.
    layout = Layout((ParamInfo("w", (2, 3), "float32"),), block_size=4)
    assert layout.fingerprint == "df6b5e96caf59171"


_BASE = (ParamInfo("a", (2, 3), "float32"), ParamInfo("b", (4,), "float16"))


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(Layout((ParamInfo("A", (2, 3), "float32"), _BASE[1]), 8), id="name"),
        pytest.param(Layout((ParamInfo("a", (3, 2), "float32"), _BASE[1]), 8), id="shape-permuted"),
        pytest.param(Layout((ParamInfo("a", (6,), "float32"), _BASE[1]), 8), id="shape-flattened"),
        pytest.param(Layout((ParamInfo("a", (2, 3, 1), "float32"), _BASE[1]), 8), id="shape-extra-dim"),
        pytest.param(Layout((ParamInfo("a", (2, 3), "float64"), _BASE[1]), 8), id="dtype"),
        pytest.param(Layout((ParamInfo("a", (2, 3), "bfloat16"), _BASE[1]), 8), id="dtype-same-size"),
        pytest.param(Layout((_BASE[1], _BASE[0]), 8), id="order"),
        pytest.param(Layout(_BASE, 7), id="block_size"),
        pytest.param(Layout(_BASE[:1], 8), id="fewer-params"),
        pytest.param(Layout((*_BASE, ParamInfo("c", (0,), "float32")), 8), id="extra-empty-param"),
    ],
)
def test_fingerprint_changes(other: Layout) -> None:
    assert Layout(_BASE, 8).fingerprint != other.fingerprint


def test_equal_layouts_are_equal_and_hash_alike() -> None:
    assert _layout() == _layout()
    assert hash(_layout()) == hash(_layout())
    assert _layout(4) != _layout(5)


# --- proto ---------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 4, DEFAULT_BLOCK_SIZE])
def test_proto_round_trip(block_size: int) -> None:
    layout = _layout(block_size)
    spec = layout_to_proto(layout)
    assert spec.block_size == block_size
    assert spec.fingerprint == layout.fingerprint
    assert [p.name for p in spec.params] == [p.name for p in layout.params]
    assert spec.params[0].dtype == pb.FLOAT32
    assert spec.params[3].dtype == pb.FLOAT16
    assert spec.params[5].dtype == pb.BFLOAT16
    assert list(spec.params[4].shape) == []
    back = layout_from_proto(spec)
    assert back == layout
    assert back.fingerprint == layout.fingerprint
    assert back.blocks == layout.blocks


def test_proto_round_trip_through_bytes() -> None:
    layout = _layout()
    back = layout_from_proto(pb.LayoutSpec.FromString(layout_to_proto(layout).SerializeToString()))
    assert back == layout


def test_from_proto_without_fingerprint_is_accepted() -> None:
    spec = layout_to_proto(_layout())
    spec.fingerprint = ""
    assert layout_from_proto(spec) == _layout()


def test_from_proto_with_wrong_fingerprint_raises() -> None:
    spec = layout_to_proto(_layout())
    spec.fingerprint = "0" * 16
    with pytest.raises(ValueError, match="fingerprint"):
        layout_from_proto(spec)


def test_from_proto_with_tampered_content_raises() -> None:
    spec = layout_to_proto(_layout())
    spec.params[0].shape[0] += 1
    with pytest.raises(ValueError, match="fingerprint"):
        layout_from_proto(spec)


def test_from_proto_rejects_unspecified_dtype() -> None:
    spec = layout_to_proto(_layout())
    spec.params[0].dtype = pb.DTYPE_UNSPECIFIED
    spec.fingerprint = ""
    with pytest.raises(ValueError):
        layout_from_proto(spec)


def test_from_proto_rejects_bad_block_size() -> None:
    spec = layout_to_proto(_layout())
    spec.fingerprint = ""
    spec.block_size = 0
    with pytest.raises(ValueError, match="block_size"):
        layout_from_proto(spec)


# --- validation ----------------------------------------------------------------------------


def test_duplicate_names_raise() -> None:
    with pytest.raises(ValueError, match="unique"):
        Layout((ParamInfo("w", (2,), "float32"), ParamInfo("w", (3,), "float32")))
    with pytest.raises(ValueError, match="unique"):
        Layout.from_named_tensors([("w", torch.zeros(2)), ("w", torch.zeros(2))])


@pytest.mark.parametrize("block_size", [0, -1, MAX_BLOCK_SIZE + 1])
def test_bad_block_size_raises(block_size: int) -> None:
    with pytest.raises(ValueError, match="block_size"):
        Layout((ParamInfo("w", (2,), "float32"),), block_size)


@pytest.mark.parametrize("block_size", [1, MAX_BLOCK_SIZE])
def test_block_size_bounds_are_inclusive(block_size: int) -> None:
    assert Layout((ParamInfo("w", (2,), "float32"),), block_size).block_size == block_size


def test_negative_dimension_raises() -> None:
    with pytest.raises(ValueError, match="negative"):
        Layout((ParamInfo("w", (2, -1), "float32"),))


def test_unknown_dtype_name_raises() -> None:
    with pytest.raises(ValueError):
        Layout((ParamInfo("w", (2,), "int64"),))


# --- views ---------------------------------------------------------------------------------


def _tensors(layout: Layout) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(p.shape, generator=gen).to(p.torch_dtype) for p in layout.params]


def test_flat_views_share_storage() -> None:
    layout = _layout()
    tensors = _tensors(layout)
    flats = layout.flat_views(tensors)
    assert len(flats) == len(tensors)
    for flat, tensor, param in zip(flats, tensors, layout.params, strict=True):
        assert flat.dim() == 1
        assert flat.numel() == param.numel
        assert flat.dtype == tensor.dtype
        if param.numel:
            assert flat.data_ptr() == tensor.data_ptr()
            flat.fill_(7)
            assert bool((tensor == 7).all())


def test_flat_views_check_count_and_shapes() -> None:
    layout = _layout()
    tensors = _tensors(layout)
    with pytest.raises(ValueError, match="expected"):
        layout.flat_views(tensors[:-1])
    tensors[0] = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="shape"):
        layout.flat_views(tensors)


def test_block_views_share_storage_and_match_blocks() -> None:
    layout = _layout(block_size=4)
    tensors = _tensors(layout)
    originals = [t.clone() for t in tensors]
    flats = layout.flat_views(tensors)
    views = layout.block_views(flats)
    assert len(views) == layout.num_blocks
    for view, block in zip(views, layout.blocks, strict=True):
        flat = flats[block.param_index]
        assert view.numel() == block.numel
        assert view.dtype == flat.dtype
        assert view.untyped_storage().data_ptr() == tensors[block.param_index].untyped_storage().data_ptr()
        assert view.data_ptr() == flat.data_ptr() + block.offset * block.itemsize
        expected = originals[block.param_index].reshape(-1)[block.offset : block.offset + block.numel]
        assert torch.equal(view, expected)
    # Writing through every block view rewrites every element of every parameter exactly once.
    for view in views:
        view.add_(1)
    for tensor, original in zip(tensors, originals, strict=True):
        assert torch.equal(tensor, original + 1)


def test_block_views_concatenate_to_flat() -> None:
    layout = _layout(block_size=3)
    flats = layout.flat_views(_tensors(layout))
    views = layout.block_views(flats)
    for index, flat in enumerate(flats):
        mine = [v for v, b in zip(views, layout.blocks, strict=True) if b.param_index == index]
        joined = torch.cat(mine) if mine else flat.new_empty(0)
        assert torch.equal(joined, flat)


# --- differences, in words ------------------------------------------------------------------------


def _shard_vs_worker(shard: Layout, worker: Layout) -> str | None:
    return shard.difference(worker, mine="the shard holds", theirs="this worker has")


def _replace_param(layout: Layout, index: int, param: ParamInfo) -> Layout:
    params = list(layout.params)
    params[index] = param
    return Layout(tuple(params), layout.block_size)


def test_equal_layouts_have_no_difference() -> None:
    assert _shard_vs_worker(_layout(), _layout()) is None
    assert _layout().difference(_layout(), names=False) is None


def test_a_differing_shape_names_the_parameter_and_both_shapes() -> None:
    other = _replace_param(_layout(), 3, ParamInfo("w2", (2, 2, 4), "float16"))
    assert _shard_vs_worker(_layout(), other) == (
        "parameter 3 'w2': the shard holds shape (2, 2, 3) float16, this worker has (2, 2, 4) float16"
    )


def test_a_differing_dtype_names_the_parameter_and_both_dtypes() -> None:
    other = _replace_param(_layout(), 5, ParamInfo("b2", (9,), "float32"))
    assert _shard_vs_worker(_layout(), other) == (
        "parameter 5 'b2': the shard holds shape (9,) bfloat16, this worker has (9,) float32"
    )


def test_the_first_difference_in_order_is_named() -> None:
    other = _replace_param(_layout(), 1, ParamInfo("b1", (5,), "float32"))
    other = _replace_param(other, 4, ParamInfo("scalar", (1,), "float64"))
    assert (_shard_vs_worker(_layout(), other) or "").startswith("parameter 1 'b1':")


def test_a_differing_name_shows_both_parameters() -> None:
    other = _replace_param(_layout(), 1, ParamInfo("bias", (4,), "float32"))
    assert _shard_vs_worker(_layout(), other) == (
        "parameter 1: the shard holds 'b1' (4,) float32, this worker has 'bias' (4,) float32"
    )


def test_names_may_be_left_out_of_the_comparison() -> None:
    positional = Layout(tuple(ParamInfo(f"0.{i}", p.shape, p.dtype) for i, p in enumerate(_layout().params)), 4)
    assert positional.positional and not _layout().positional
    assert _layout().difference(positional, names=False) is None
    assert _layout().difference(_replace_param(positional, 3, ParamInfo("0.3", (12,), "float16")), names=False) == (
        "parameter 3 'w2'/'0.3': this layout has shape (2, 2, 3) float16, the other has (12,) float16"
    )


def test_named_against_positional_says_which_optimizer_input_differs() -> None:
    positional = Layout(tuple(ParamInfo(f"0.{i}", p.shape, p.dtype) for i, p in enumerate(_layout().params)), 4)
    message = _shard_vs_worker(_layout(), positional)
    assert message is not None
    assert message.startswith("parameter 0: the shard holds 'w1' (3, 5) float32, this worker has '0.0' (3, 5) float32")
    assert "model.named_parameters()" in message and "model.parameters()" in message


@pytest.mark.parametrize("ours_longer", [True, False])
def test_a_differing_count_names_the_first_parameter_one_side_lacks(ours_longer: bool) -> None:
    short = Layout(_layout().params[:4], 4)
    ours, theirs = (_layout(), short) if ours_longer else (short, _layout())
    side = "the shard holds" if ours_longer else "this worker has"
    count = "the shard holds 6, this worker has 4" if ours_longer else "the shard holds 4, this worker has 6"
    assert _shard_vs_worker(ours, theirs) == (
        f"parameter count: {count} (from parameter 4 'scalar' () float64 on, only {side} them)"
    )


def test_a_differing_block_size_is_named_alone_or_after_a_parameter() -> None:
    assert _shard_vs_worker(_layout(4), _layout(65536)) == "block size: the shard holds 4, this worker has 65536"
    other = _replace_param(_layout(8), 0, ParamInfo("w1", (3, 4), "float32"))
    assert _shard_vs_worker(_layout(4), other) == (
        "parameter 0 'w1': the shard holds shape (3, 5) float32, this worker has (3, 4) float32; "
        "block size: the shard holds 4, this worker has 8"
    )


@pytest.mark.parametrize("name", ["0.0", "12.345"])
def test_positional_names(name: str) -> None:
    assert is_positional_name(name)
    assert not any(is_positional_name(n) for n in ("0", "fc.0", "0.weight", "0.0.1", "layer.0.0"))
