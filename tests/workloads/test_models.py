"""The model zoo (mlp, cnn, vgg, vgg-bn, charlm) and bring-your-own models given as package.module:function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ranger_ps.errors import UserError
from ranger_ps.workloads.models import MODELS, VGG_CHANNELS, CharLM, build_model, describe_model

BYO = "tests.byo_models"

# (model, input shape, classes or vocabulary, output shape for a batch of 2)
SHAPES = [
    ("mlp", (64,), 10, (2, 10)),
    ("mlp", (3, 32, 32), 10, (2, 10)),
    ("cnn", (64,), 10, (2, 10)),
    ("cnn", (8, 8), 10, (2, 10)),
    ("cnn", (1, 28, 28), 10, (2, 10)),
    ("cnn", (784,), 10, (2, 10)),
    ("cnn", (3, 32, 32), 10, (2, 10)),
    ("cnn", (1,), 3, (2, 3)),
    ("vgg", (3, 32, 32), 10, (2, 10)),
    ("vgg", (1, 32, 32), 100, (2, 100)),
    ("vgg-bn", (3, 32, 32), 10, (2, 10)),
    ("charlm", (16,), 30, (2, 16, 30)),
    ("charlm", (64,), 65, (2, 64, 65)),
]

# one typical configuration per model, for the checks that do not depend on the shape
TYPICAL = {
    "mlp": ((64,), 10),
    "cnn": ((64,), 10),
    "vgg": ((3, 32, 32), 10),
    "vgg-bn": ((3, 32, 32), 10),
    "charlm": ((32,), 40),
}


def example_batch(name: str, input_shape: tuple[int, ...], num_classes: int, batch: int = 2) -> torch.Tensor:
    """Random inputs: token ids for charlm, floats otherwise (from a local generator, not the global RNG)."""
    generator = torch.Generator().manual_seed(1234)
    if name == "charlm":
        return torch.randint(0, num_classes, (batch, *input_shape), generator=generator)
    return torch.randn((batch, *input_shape), generator=generator)


def example_targets(name: str, input_shape: tuple[int, ...], num_classes: int, batch: int = 2) -> torch.Tensor:
    """Targets shaped like the model's predictions: (B, T) next tokens for charlm, (B,) labels otherwise."""
    generator = torch.Generator().manual_seed(5678)
    shape = (batch, *input_shape) if name == "charlm" else (batch,)
    return torch.randint(0, num_classes, shape, generator=generator)


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The caller's loss, one formula for classification (B, C) and language-model (B, T, V) logits."""
    return nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten())


def seeded(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, input_shape, num_classes)


def test_registry_has_the_built_ins() -> None:
    assert set(MODELS) == {"mlp", "cnn", "vgg", "vgg-bn", "charlm"}
    assert set(TYPICAL) == set(MODELS)


@pytest.mark.parametrize(("name", "input_shape", "num_classes", "expected"), SHAPES)
def test_output_shapes(name: str, input_shape: tuple[int, ...], num_classes: int, expected: tuple[int, ...]) -> None:
    model = seeded(name, input_shape, num_classes)
    with torch.no_grad():
        out = model(example_batch(name, input_shape, num_classes))
    assert tuple(out.shape) == expected
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(TYPICAL))
def test_gradients_reach_every_parameter(name: str) -> None:
    input_shape, num_classes = TYPICAL[name]
    model = seeded(name, input_shape, num_classes)
    x = example_batch(name, input_shape, num_classes)
    named = list(model.named_parameters())
    loss = loss_of(model(x), example_targets(name, input_shape, num_classes))
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    for (pname, p), grad in zip(named, grads, strict=True):
        assert p.requires_grad, pname
        assert grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(grad).all(), pname
        assert grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name", sorted(TYPICAL))
def test_same_seed_same_parameters(name: str) -> None:
    input_shape, num_classes = TYPICAL[name]
    first = seeded(name, input_shape, num_classes, seed=7).state_dict()
    second = seeded(name, input_shape, num_classes, seed=7).state_dict()
    other = seeded(name, input_shape, num_classes, seed=8).state_dict()
    assert list(first) == list(second)
    for key, value in first.items():
        assert torch.equal(value, second[key]), f"{name}: {key} differs under the same seed"
    assert any(not torch.equal(value, other[key]) for key, value in first.items())


@pytest.mark.parametrize("name", sorted(set(TYPICAL) - {"vgg-bn"}))
def test_no_buffers_only_parameters(name: str) -> None:
    """Everything that defines these models is a parameter (vgg-bn's statistics are buffers the workers
    hand to the optimizer)."""
    input_shape, num_classes = TYPICAL[name]
    model = seeded(name, input_shape, num_classes)
    assert list(model.buffers()) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", sorted(TYPICAL))
def test_eval_is_deterministic(name: str) -> None:
    input_shape, num_classes = TYPICAL[name]
    model = seeded(name, input_shape, num_classes).eval()
    x = example_batch(name, input_shape, num_classes)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_vgg_structure() -> None:
    model = seeded("vgg", (3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 256] == list(VGG_CHANNELS)
    assert [c.in_channels for c in convs] == [3, 64, 128, 256, 256]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert len(pools) == 5
    assert len(linears) == 1
    assert (linears[0].in_features, linears[0].out_features) == (256, 10)
    assert sum(p.numel() for p in model.parameters()) == 1_553_546


def test_vgg_bn_is_vgg_with_batch_norm_after_every_convolution() -> None:
    model = seeded("vgg-bn", (3, 32, 32), 10)
    kinds = [type(m).__name__ for m in model.children()]
    assert kinds[:4] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] and kinds.count("BatchNorm2d") == 5
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    floating = [name for name, b in model.named_buffers() if b.is_floating_point()]
    assert floating == [f"{i}.{stat}" for i in (1, 5, 9, 13, 17) for stat in ("running_mean", "running_var")]
    with pytest.raises(UserError, match=r"vgg-bn needs 32x32 images"):
        build_model("vgg-bn", (3, 28, 28), 10)


@pytest.mark.parametrize("input_shape", [(3, 28, 28), (64,), (3072,), (3, 32, 16)])
def test_vgg_rejects_other_shapes(input_shape: tuple[int, ...]) -> None:
    with pytest.raises(UserError, match=r"vgg needs 32x32 images.*\(3, 32, 32\)|vgg needs image inputs"):
        build_model("vgg", input_shape, 10)


@pytest.mark.parametrize("input_shape", [(63,), (2, 3, 4, 5), (0,)])
def test_cnn_rejects_non_images(input_shape: tuple[int, ...]) -> None:
    with pytest.raises(UserError, match="cnn needs image inputs"):
        build_model("cnn", input_shape, 10)


def test_charlm_is_causal() -> None:
    vocab, t = 20, 12
    model = seeded("charlm", (t,), vocab)
    x = example_batch("charlm", (t,), vocab)
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % vocab
    changed[:, 11] = (changed[:, 11] + 3) % vocab
    for training in (True, False):  # eval mode may take PyTorch's fused fast path: check both
        model.train(training)
        with torch.no_grad():
            before, after = model(x), model(changed)
        torch.testing.assert_close(before[:, :7], after[:, :7], rtol=0, atol=1e-6)
        assert not torch.allclose(before[:, 7], after[:, 7])


def test_charlm_accepts_shorter_sequences_and_rejects_bad_input() -> None:
    model = seeded("charlm", (16,), 30)
    assert isinstance(model, CharLM)
    with torch.no_grad():
        assert tuple(model(torch.zeros(3, 5, dtype=torch.int64)).shape) == (3, 5, 30)
    with pytest.raises(UserError, match="at most 16 tokens"):
        model(torch.zeros(1, 17, dtype=torch.int64))
    with pytest.raises(UserError, match="integer token ids"):
        model(torch.zeros(1, 16))
    with pytest.raises(UserError, match=r"charlm needs sequences of token ids"):
        build_model("charlm", (8, 8), 10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "input_shape", "num_classes", "lr"), [("cnn", (64,), 10, 0.1), ("charlm", (16,), 12, 0.1)]
)
def test_a_few_sgd_steps_reduce_the_loss(name: str, input_shape: tuple[int, ...], num_classes: int, lr: float) -> None:
    model = seeded(name, input_shape, num_classes)
    x = example_batch(name, input_shape, num_classes, batch=16)
    # random labels for cnn (memorized); for charlm a next-token rule it can learn, "the successor of this token"
    y = (x + 1) % num_classes if name == "charlm" else example_targets(name, input_shape, num_classes, batch=16)
    params = list(model.parameters())
    losses = []
    for _ in range(15):  # plain SGD by hand: building a torch.optim optimizer first imports torch._dynamo (seconds)
        loss = loss_of(model(x), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(lr * g)
        losses.append(float(loss.detach()))
    with torch.no_grad():
        final = float(loss_of(model(x), y))
    assert final < 0.7 * losses[0], losses


def test_byo_model() -> None:
    torch.manual_seed(3)
    model = build_model(f"{BYO}:tiny_classifier", (64,), 10)
    torch.manual_seed(3)
    again = build_model(f"{BYO}:tiny_classifier", (1, 2, 3), 99)  # shape and classes are ignored
    with torch.no_grad():
        out = model(torch.randn(5, 64))
    assert tuple(out.shape) == (5, 10)
    for (key, value), (key2, value2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert key == key2 and torch.equal(value, value2)


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("not_a_module", r"returned a str, not a torch\.nn\.Module"),
        ("no_parameters", "returned a ReLU with no trainable parameters"),
        ("frozen", "returned a Linear with no trainable parameters"),
        ("needs_arguments", "calling it with no arguments failed: TypeError"),
        ("raises", "calling it with no arguments failed: RuntimeError: out of coffee"),
        ("NOT_CALLABLE", "not a function"),
        ("missing", "has no attribute 'missing'"),
    ],
)
def test_byo_model_errors(function: str, message: str) -> None:
    spec = f"{BYO}:{function}"
    with pytest.raises(UserError, match=message) as caught:
        build_model(spec, (64,), 10)
    assert spec in str(caught.value)
    assert "--model" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_byo_missing_module() -> None:
    with pytest.raises(UserError, match="cannot import module 'no_such_package_xyz.models'"):
        build_model("no_such_package_xyz.models:net", (64,), 10)


@pytest.mark.parametrize("name", ["resnet", "MLP", "", "my models:net"])
def test_unknown_model(name: str) -> None:
    with pytest.raises(UserError, match="unknown model") as caught:
        build_model(name, (64,), 10)
    text = str(caught.value)
    assert "charlm, cnn, mlp, vgg" in text
    assert "package.module:function" in text


def test_describe_model() -> None:
    model = seeded("mlp", (64,), 10)
    assert describe_model(model) == "Sequential: 9,610 parameters, 0.04 MB"
    assert isinstance(model, nn.Sequential) and isinstance(model[3], nn.Linear)
    model[3].requires_grad_(False)  # the 128 -> 10 read-out: 1,290 parameters
    assert describe_model(model) == "Sequential: 9,610 parameters (8,320 trainable), 0.04 MB"
