"""Server-side update rules: pure torch functions over blocks, with per-block state.

A rule takes the current values of some blocks, their gradients and their states, and updates
values and states in place. The parameter server and the in-process optimizer call the very same
functions (:func:`apply_update`: truncation, then the rule), which is what makes "distributed
equals local" hold exactly. Nothing here knows about gRPC, processes or the network.

Rules:

- ``sgd``: momentum, dampening, Nesterov and L2 weight decay, exactly as ``torch.optim.SGD``.
- ``adamw``: exactly as ``torch.optim.AdamW`` (decoupled weight decay, bias correction).
- ``ranger``: RAdam + Lookahead as in the widely used reference implementation (Less Wright's
  ``Ranger``, 2019-2020): betas (0.95, 0.999), eps 1e-5, the un-rectified step while the SMA length
  is at most ``n_sma_threshold`` (5), the rectified one after; every ``k`` (6) updates the fast
  weights move ``alpha`` (0.5) of the way to the slow weights and are reset to them; decoupled
  weight decay. Gradient centralization belongs to the worker (:func:`ranger_ps.algorithm.selection.centralize_`),
  applied to the dense gradient before error feedback, never to a zero-filled sparse gradient here.

A block's state counts the updates that block received: with random block pushes, a block's
"step" is its own, as if each block had its own optimizer. State tensors are allocated up front
(:func:`new_block_state`) so the in-process optimizer can keep them as views into per-parameter
tensors; low-precision parameters (float16, bfloat16) keep float32 state and are updated in float32.

The rule settings travel in the registration handshake as a msgpack map
(:meth:`RuleConfig.to_msgpack`): the first worker that initializes a shard sets them, and a later
worker with different settings is refused with a message naming the difference.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from ranger_ps.algorithm.truncation import truncate

RULE_NAMES = ("sgd", "adamw", "ranger")
_DEFAULT_BETAS = {"sgd": (0.9, 0.999), "adamw": (0.9, 0.999), "ranger": (0.95, 0.999)}
_DEFAULT_EPS = {"sgd": 1e-8, "adamw": 1e-8, "ranger": 1e-5}
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _finite(name: str, value: float, *, low: float | None = None, high: float | None = None) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


@dataclass(frozen=True)
class RuleConfig:
    """The update rule, its hyper-parameters and the server-side gradient truncation.

    Attributes:
        name: ``"sgd"``, ``"adamw"`` or ``"ranger"``.
        lr: learning rate (>= 0).
        momentum: ``sgd`` only: momentum factor (the buffer starts as the first gradient, then
            ``buf = momentum * buf + (1 - dampening) * grad``).
        dampening: ``sgd`` only.
        nesterov: ``sgd`` only; needs ``momentum > 0`` and ``dampening == 0``.
        weight_decay: ``sgd``: L2 penalty added to the gradient; ``adamw``/``ranger``: decoupled.
        betas: ``adamw``/``ranger`` moment decay rates; None means the rule's default
            ((0.9, 0.999) for adamw, (0.95, 0.999) for ranger).
        eps: ``adamw``/``ranger`` denominator term; None means the rule's default (1e-8, 1e-5).
        alpha: ``ranger`` Lookahead step towards the slow weights.
        k: ``ranger`` Lookahead synchronisation period, in updates of the block.
        n_sma_threshold: ``ranger`` SMA length above which RAdam's rectified step is used.
        truncate_below: zero gradient entries with ``|g| < truncate_below`` (0 = off).
        truncation_residual: keep what truncation removed in a per-block residual, added to the
            block's next gradient (so truncation delays mass instead of dropping it).
        clip_value: clamp gradient entries to ``[-clip_value, clip_value]`` (None = off).
        clip_norm: scale each block's gradient to an L2 norm of at most ``clip_norm`` (None = off).
    """

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] | None = None
    eps: float | None = None
    alpha: float = 0.5
    k: int = 6
    n_sma_threshold: float = 5.0
    truncate_below: float = 0.0
    truncation_residual: bool = False
    clip_value: float | None = None
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        if self.name not in RULE_NAMES:
            raise ValueError(f"unknown rule {self.name!r}; choose from {', '.join(RULE_NAMES)}")
        if self.betas is None:
            object.__setattr__(self, "betas", _DEFAULT_BETAS[self.name])
        else:
            object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))
        if self.eps is None:
            object.__setattr__(self, "eps", _DEFAULT_EPS[self.name])
        _finite("lr", self.lr, low=0.0)  # 0 is allowed, as in torch: schedules may pass through it
        _finite("momentum", self.momentum, low=0.0)
        if not self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.name != "sgd" and self.momentum != 0:
            raise ValueError(f"momentum applies to the sgd rule; {self.name} takes betas instead")
        _finite("dampening", self.dampening, low=0.0, high=1.0)
        _finite("weight_decay", self.weight_decay, low=0.0)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening == 0")
        for i, beta in enumerate(self.resolved_betas):
            _finite(f"betas[{i}]", beta, low=0.0)
            if not beta < 1:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
        _finite("eps", self.resolved_eps, low=0.0)
        _finite("alpha", self.alpha, low=0.0, high=1.0)
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        _finite("n_sma_threshold", self.n_sma_threshold)
        _finite("truncate_below", self.truncate_below, low=0.0)
        for name in ("clip_value", "clip_norm"):
            value = getattr(self, name)
            if value is not None:
                _finite(name, value)
                if not value > 0:
                    raise ValueError(f"{name} must be > 0 when set, got {value}")

    @property
    def resolved_betas(self) -> tuple[float, float]:
        assert self.betas is not None  # filled in by __post_init__
        return self.betas

    @property
    def resolved_eps(self) -> float:
        assert self.eps is not None  # filled in by __post_init__
        return self.eps

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.resolved_betas)
        return out

    def to_msgpack(self) -> bytes:
        packed: bytes = msgpack.packb(self.to_dict(), use_bin_type=True)
        return packed

    @classmethod
    def from_dict(cls, raw: object) -> RuleConfig:
        """Validate and build from a plain map (e.g. decoded msgpack); raises ``ValueError``."""
        if not isinstance(raw, dict):
            raise ValueError("rule settings must be a map")
        kinds = {f.name: _FIELD_KINDS[f.name] for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(kinds)
        if unknown:
            raise ValueError(f"unknown rule settings: {', '.join(sorted(map(str, unknown)))}")
        return cls(**{key: _coerce(key, kinds[key], value) for key, value in raw.items()})

    @classmethod
    def from_msgpack(cls, data: bytes) -> RuleConfig:
        """Decode a handshake blob; raises ``ValueError`` on anything unexpected."""
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types
            raise ValueError(f"rule settings are not valid msgpack: {exc}") from None
        return cls.from_dict(raw)

    def differences(self, other: RuleConfig) -> list[str]:
        """Human-readable ``key: ours != theirs`` for every differing setting."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]

    def state_names(self) -> tuple[str, ...]:
        """The rule-state tensors each block carries under these settings."""
        if self.name == "sgd":
            return ("momentum_buffer",) if self.momentum else ()
        if self.name == "adamw":
            return ("exp_avg", "exp_avg_sq")
        return ("exp_avg", "exp_avg_sq", "slow_buffer")


_FIELD_KINDS = {
    "name": "str",
    "lr": "float",
    "momentum": "float",
    "dampening": "float",
    "nesterov": "bool",
    "weight_decay": "float",
    "betas": "pair",
    "eps": "float?",
    "alpha": "float",
    "k": "int",
    "n_sma_threshold": "float",
    "truncate_below": "float",
    "truncation_residual": "bool",
    "clip_value": "float?",
    "clip_norm": "float?",
}


def _coerce(key: str, kind: str, value: object) -> Any:
    if kind.endswith("?") and value is None:
        return None
    kind = kind.rstrip("?")
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "pair" and value is None:
        return None
    if (
        kind == "pair"
        and isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        return (float(value[0]), float(value[1]))
    raise ValueError(f"rule setting {key} must be {kind}, got {type(value).__name__}")


class BlockState:
    """One block's rule state: its update count and its state tensors.

    ``counter`` is a one-element int64 tensor (so it can be a view into an optimizer's state and
    travel in ``state_dict``); ``tensors`` maps state names to flat tensors of the block's size.
    """

    __slots__ = ("counter", "tensors", "residual")

    def __init__(
        self,
        tensors: dict[str, torch.Tensor] | None = None,
        counter: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> None:
        self.tensors = tensors if tensors is not None else {}
        self.counter = counter if counter is not None else torch.zeros(1, dtype=torch.int64)
        self.residual = residual  # truncation residual, when the settings keep one

    @property
    def step(self) -> int:
        """Updates this block has received."""
        return int(self.counter[0])

    def advance(self) -> None:
        self.counter.add_(1)


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Rule state is float32 for low-precision parameters, the parameter's dtype otherwise."""
    return torch.float32 if param_dtype in _LOW_PRECISION else param_dtype


def new_block_state(config: RuleConfig, numel: int, param_dtype: torch.dtype) -> BlockState:
    """A fresh, zeroed state for one block of ``numel`` elements."""
    dtype = state_dtype(param_dtype)
    tensors = {name: torch.zeros(numel, dtype=dtype) for name in config.state_names()}
    residual = torch.zeros(numel, dtype=dtype) if config.truncation_residual else None
    return BlockState(tensors, residual=residual)


Rule = Callable[[RuleConfig, torch.Tensor, torch.Tensor, BlockState], None]


def sgd(config: RuleConfig, param: torch.Tensor, grad: torch.Tensor, state: BlockState) -> None:
    """SGD with momentum, dampening, Nesterov and weight decay, as ``torch.optim.SGD`` does it."""
    d_p = grad
    if config.weight_decay:
        d_p = d_p.add(param, alpha=config.weight_decay)
    if config.momentum:
        buf = state.tensors["momentum_buffer"]
        if state.step == 0:
            buf.copy_(d_p)
        else:
            buf.mul_(config.momentum).add_(d_p, alpha=1 - config.dampening)
        d_p = d_p.add(buf, alpha=config.momentum) if config.nesterov else buf
    param.add_(d_p, alpha=-config.lr)


def adamw(config: RuleConfig, param: torch.Tensor, grad: torch.Tensor, state: BlockState) -> None:
    """AdamW as ``torch.optim.AdamW`` does it (single-tensor path, no amsgrad)."""
    beta1, beta2 = config.resolved_betas
    step = state.step + 1
    exp_avg, exp_avg_sq = state.tensors["exp_avg"], state.tensors["exp_avg_sq"]
    param.mul_(1 - config.lr * config.weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = config.lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(config.resolved_eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def radam_step_size(step: int, betas: tuple[float, float], n_sma_threshold: float) -> tuple[float, bool]:
    """RAdam's step size at ``step`` (1-based) and whether the rectified update applies."""
    beta1, beta2 = betas
    beta2_t = beta2**step
    n_sma_max = 2 / (1 - beta2) - 1
    n_sma = n_sma_max - 2 * step * beta2_t / (1 - beta2_t)
    if n_sma > n_sma_threshold:
        rect = (1 - beta2_t) * (n_sma - 4) / (n_sma_max - 4) * (n_sma - 2) / n_sma * n_sma_max / (n_sma_max - 2)
        return math.sqrt(rect) / (1 - beta1**step), True
    return 1.0 / (1 - beta1**step), False


def ranger(config: RuleConfig, param: torch.Tensor, grad: torch.Tensor, state: BlockState) -> None:
    """RAdam + Lookahead, step for step as the reference ``Ranger`` (gradient centralization excluded)."""
    beta1, beta2 = config.resolved_betas
    exp_avg, exp_avg_sq, slow = state.tensors["exp_avg"], state.tensors["exp_avg_sq"], state.tensors["slow_buffer"]
    if state.step == 0:
        slow.copy_(param)  # the reference creates the slow weights at a parameter's first step
    step = state.step + 1
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    step_size, rectified = radam_step_size(step, (beta1, beta2), config.n_sma_threshold)
    if config.weight_decay:
        param.add_(param, alpha=-config.weight_decay * config.lr)
    if rectified:
        denom = exp_avg_sq.sqrt().add_(config.resolved_eps)
        param.addcdiv_(exp_avg, denom, value=-step_size * config.lr)
    else:
        param.add_(exp_avg, alpha=-step_size * config.lr)
    if step % config.k == 0:
        slow.add_(param - slow, alpha=config.alpha)
        param.copy_(slow)


RULES: dict[str, Rule] = {"sgd": sgd, "adamw": adamw, "ranger": ranger}
if set(RULES) != set(RULE_NAMES):  # pragma: no cover - guards future edits
    raise ImportError("RULES and RULE_NAMES disagree")


def apply_update(
    config: RuleConfig,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[BlockState],
) -> None:
    """Truncate the gradients, then apply the rule to each block, in place.

    ``params`` are the blocks' values (written in place), ``grads`` their gradients (never
    modified), ``states`` their states (updated, counters advanced).
    """
    if _can_batch(config, params, grads):
        _sgd_batched(config, list(params), list(grads), states)
        return
    rule = RULES[config.name]
    for param, grad, state in zip(params, grads, states, strict=True):
        compute = param.float() if param.dtype in _LOW_PRECISION else param
        g = truncate(config, grad.to(compute.dtype), state.residual)
        rule(config, compute, g, state)
        if compute is not param:
            param.copy_(compute)
        state.advance()


def _can_batch(config: RuleConfig, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> bool:
    """Whether :func:`_sgd_batched` computes exactly what the per-block loop would.

    It does for sgd without truncation or clipping on full-precision blocks whose gradients already
    have the parameters' dtype: the same kernels run on the same tensors, only dispatched as one
    ``torch._foreach_*`` call per operation instead of one Python call per block and operation.
    """
    if config.name != "sgd" or len(params) < 2:
        return False
    if config.truncate_below > 0 or config.truncation_residual:
        return False
    if config.clip_value is not None or config.clip_norm is not None:
        return False
    dtype = params[0].dtype
    return (
        dtype not in _LOW_PRECISION and all(p.dtype == dtype for p in params) and all(g.dtype == dtype for g in grads)
    )


def _sgd_batched(
    config: RuleConfig, params: list[torch.Tensor], grads: list[torch.Tensor], states: Sequence[BlockState]
) -> None:
    """:func:`sgd` over many blocks at once with ``torch._foreach_*`` (bitwise the same result)."""
    d_ps = grads
    if config.weight_decay:
        d_ps = list(torch._foreach_add(grads, params, alpha=config.weight_decay))
    if config.momentum:
        bufs = [s.tensors["momentum_buffer"] for s in states]
        fresh = [i for i, s in enumerate(states) if s.step == 0]
        if fresh:
            torch._foreach_copy_([bufs[i] for i in fresh], [d_ps[i] for i in fresh])
        seen = [i for i, s in enumerate(states) if s.step != 0] if fresh else range(len(states))
        if len(seen):
            running = [bufs[i] for i in seen]
            torch._foreach_mul_(running, config.momentum)
            torch._foreach_add_(running, [d_ps[i] for i in seen], alpha=1 - config.dampening)
        d_ps = list(torch._foreach_add(d_ps, bufs, alpha=config.momentum)) if config.nesterov else bufs
    torch._foreach_add_(params, d_ps, alpha=-config.lr)
    torch._foreach_add_([s.counter for s in states], 1)
