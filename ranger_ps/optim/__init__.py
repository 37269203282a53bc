"""``ranger_ps.Ranger``: the whole algorithm as a drop-in ``torch.optim.Optimizer``.

Two places can hold the update rule (:mod:`ranger_ps.algorithm.outer`):

- **inner** (``outer="mean"``, the default, or ``"sum"``, ``"sgd"``): every step runs the rule densely
  on this worker's *view* (the weights it last pulled plus its own update it has not pushed yet),
  so its own pending progress is never invisible to it. What it owes the cluster is a residual in
  weight units; every ``local_steps`` steps random blocks of it are pushed (optionally quantized,
  the rounding error kept in the residual), and what the shards send back lands as
  ``pulled + residual``. A worker that finishes flushes its whole residual (:meth:`Ranger.flush`).
- **rule** (the classic parameter server): gradients with error feedback are pushed and the rule
  runs where the weights live, per block with its own state.

Without ``servers`` the shards' part runs in this process, on the same functions, so
``Ranger(model.parameters(), lr=0.001, momentum=0.9)`` is exactly ``torch.optim.SGD`` and a one-worker
cluster follows the same trajectory. State lives per parameter in ``optimizer.state``, so
``state_dict()`` / ``load_state_dict()`` work as for any torch optimizer. Where pushes are applied is
a :class:`~ranger_ps.client.backend.Backend`: in this process
(:class:`~ranger_ps.optim.local.LocalBackend`) or on a cluster
(:class:`~ranger_ps.client.remote.RemoteBackend`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ranger_ps.algorithm.feedback import ErrorFeedback
from ranger_ps.algorithm.layout import Layout
from ranger_ps.algorithm.quantize import Quantized, dequantize, quantize
from ranger_ps.algorithm.rules import BlockState, RuleConfig, apply_update, state_dtype
from ranger_ps.algorithm.selection import centralize_, choose_blocks, density_at
from ranger_ps.client.backend import Backend, OutgoingBlock, PulledBlock, Traffic
from ranger_ps.client.sharded import ShardedClient
from ranger_ps.client.staging import PinnedStaging, needs_staging
from ranger_ps.config.optimizer import RangerConfig
from ranger_ps.optim.local import LocalBackend
from ranger_ps.settings import spec_by_key, specs
from ranger_ps.wire.security import ClientSecurity
from ranger_ps.wire.stats import ShardStats

log = logging.getLogger(__name__)

GROUP_KEYS: tuple[str, ...] = (*(s.key for s in specs(RuleConfig)), "use_gc")
"""Hyper-parameters a param group carries (each group's rule settings, and centralization)."""


def rule_config_from_group(group: dict[str, Any]) -> RuleConfig:
    """The :class:`RuleConfig` a param group's hyper-parameters describe."""
    return RuleConfig(**{s.name: group[s.key] for s in specs(RuleConfig)})


def _keyword_docs() -> str:
    lines = ["", "Keyword arguments (each one a setting of :class:`ranger_ps.config.optimizer.RangerConfig`):", ""]
    for spec in specs(RangerConfig):
        lines.append(f"- ``{spec.key}`` (default {spec.default_shown()}): {spec.info.help}.")
    lines.append(
        "- ``security``: with servers, the token and TLS settings (:class:`~ranger_ps.wire.security.ClientSecurity`)."
    )
    return "\n    ".join(lines)


class Ranger(torch.optim.Optimizer):
    """Randomized block SGD for parameter servers, with sgd, adamw or ranger (RAdam + Lookahead) updates.

    ``Ranger(params, lr=1e-3, momentum=0.0, **settings)``: ``params`` are parameters,
    ``(name, parameter)`` pairs (``model.named_parameters()``, which keeps names in checkpoints) or
    param groups, as for any torch optimizer; ``lr`` and ``momentum`` default as in
    ``torch.optim.SGD``, which ``Ranger(model.parameters(), lr=0.001, momentum=0.9)`` equals.

    With ``overlap=True`` (and servers) ``step()`` returns as soon as the push is encoded; the push
    and the pull of the new weights run in the background and land at the next ``zero_grad()``
    (which a training loop calls right before its forward pass) or ``step()``, whichever comes
    first; :meth:`synchronize` waits for them explicitly. A push that fails in the background is
    raised there. Default off: ``step()`` returns with the cluster's newest weights.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        *,
        security: ClientSecurity | None = None,
        **settings: Any,
    ) -> None:
        by_key = spec_by_key(RangerConfig)
        unknown = sorted(set(settings) - set(by_key))
        if unknown:
            raise TypeError(f"Ranger() got unexpected keyword arguments: {', '.join(unknown)}")
        config = RangerConfig(**{by_key[k].name: v for k, v in {"lr": lr, "momentum": momentum, **settings}.items()})
        self.config = config
        defaults = {key: getattr(config, by_key[key].name) for key in GROUP_KEYS}
        super().__init__(params, defaults)
        self.selection = config.selection_config()
        self.inner = config.inner
        self._block_size = config.block_size
        self._index_params()
        self.observer = config.observer
        self.last_chosen: list[int] = []  # block ids pushed by the last push
        self.pushes = 0  # pushes made so far (every step, or every local_steps steps, and flushes)
        self._steps = 0
        self._staging: PinnedStaging | None = None
        self.backend: Backend
        if config.servers is not None:
            from ranger_ps.client.remote import RemoteBackend

            configs = {rule_config_from_group(g) for g in self.param_groups}
            if len(configs) != 1:
                raise ValueError("with servers, every param group must use the same rule settings")
            self._cluster_rule = configs.pop()
            if needs_staging(self._params):  # a model on a GPU: pulled blocks land through pinned host buffers
                self._staging = PinnedStaging(self.layout, [p.device for p in self._params])
            remote = RemoteBackend(
                config.servers,
                self.layout,
                self._params,
                self._cluster_rule,
                config,
                worker_id=config.worker_id,
                observer=config.observer,
                consistency=config.consistency or "",
                use_uvloop=config.use_uvloop,
                security=security,
            )
            self.backend = remote
            try:
                self._copy_into_params(remote.first_pull)  # the cluster's weights, as they are now
            except BaseException:
                remote.close()
                raise
        else:
            self.backend = self._local_backend()

    def _local_backend(self) -> LocalBackend:
        return LocalBackend(self.layout, self._param_configs, self._local_block, hands_back=self.inner)

    # -- parameters ----------------------------------------------------------------------------

    def _index_params(self) -> None:
        """(Re)derive the flat parameter list, the layout and each parameter's group."""
        self._params: list[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        for p in self._params:
            if not p.is_contiguous():
                raise ValueError("Ranger needs contiguous parameters")
        # Named parameters (model.named_parameters()) keep their names in the layout, so checkpoints
        # export as a state dict the model loads; plain tensors are named "group.index".
        self.layout = Layout.from_named_tensors(
            (
                (g["param_names"][pi] if "param_names" in g else f"{gi}.{pi}", p)
                for gi, g in enumerate(self.param_groups)
                for pi, p in enumerate(g["params"])
            ),
            self._block_size,
        )
        self._group_of = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, as torch does; refused with servers (the layout is fixed at registration)."""
        constructed = hasattr(self, "layout")
        if constructed and self.config.servers is not None:
            raise RuntimeError("with servers, the parameters are fixed at registration: add_param_group is refused")
        super().add_param_group(param_group)
        if constructed:
            self._index_params()
            self.backend = self._local_backend()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state as torch does, but keep each state tensor's own dtype.

        torch casts every state tensor except ``step`` to its parameter's dtype; here the per-block
        counters are int64 and low-precision parameters keep float32 state, so the saved tensors are
        restored as they were saved.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for saved_id, p in zip(saved_ids, self._params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.detach().to(p.device, copy=True)

    # -- the cluster ----------------------------------------------------------------------------

    @property
    def worker_id(self) -> int:
        """The id this optimizer pushes as (assigned by the servers unless given; 0 in process)."""
        return self.backend.worker_id

    @property
    def traffic(self) -> Traffic:
        """Bytes pushed, pulled, and what dense pushes would have cost, so far."""
        return self.backend.traffic

    @property
    def client(self) -> ShardedClient | None:
        """With servers, the client that talks to the shards (None in process)."""
        return getattr(self.backend, "client", None)

    def stats(self) -> list[ShardStats]:
        """With servers, what each shard reports (an empty list in process)."""
        return self.backend.stats()

    def synchronize(self) -> None:
        """Land what the last push brought back (with ``overlap=True``, wait for it); raise a failure
        of an earlier overlapped push."""
        self._land(self.backend.collect())

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Land a pull in flight (``overlap=True``), then reset the gradients as torch does."""
        self.synchronize()
        super().zero_grad(set_to_none)

    def refresh(self) -> None:
        """With servers: land every block that moved since this worker last saw it."""
        if self.config.servers is None:
            raise RuntimeError("refresh() needs servers")
        self._land(self.backend.pull_all())

    @torch.no_grad()
    def flush(self) -> None:
        """Push everything this worker still owes the cluster (its whole residual, in float32).

        With an inner rule, a worker that finishes or leaves calls this (``close()`` does), so that
        nothing it computed is thrown away; the outer rule applies to the flush as to any push (the
        default ``mean`` averages the flushes of all workers). Nothing to do under the rule mode.
        """
        if not self.inner or self.observer or not self.state:
            return
        self.synchronize()
        blocks = []
        for block_id, residual in enumerate(self._residual_blocks()):
            if bool(residual.any()):
                blocks.append(OutgoingBlock(block_id, residual.detach().to("cpu", torch.float32, copy=True)))
                residual.zero_()
        if blocks:
            self.last_chosen = [b.block_id for b in blocks]
            self._push(blocks, steps=0)
            self.synchronize()

    def close(self) -> None:
        """Flush what this worker owes (inner rule), land what is in flight, close the connections."""
        try:
            if self.config.servers is not None:
                self.flush()
        finally:
            self.backend.close()

    def __enter__(self) -> Ranger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state --------------------------------------------------------------------------------------

    def _param_configs(self) -> list[RuleConfig]:
        configs = [rule_config_from_group(g) for g in self.param_groups]
        return [configs[g] for g in self._group_of]

    def _param_state(self, index: int) -> dict[str, Any]:
        """A parameter's state, created at its first step (by mode: see the module docstring)."""
        p = self._params[index]
        state: dict[str, Any] = self.state[p]
        if state:
            return state
        config = rule_config_from_group(self.param_groups[self._group_of[index]])
        dtype = state_dtype(p.dtype)
        nblocks = -(-p.numel() // self.layout.block_size)

        def zeros(numel: int = p.numel(), kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(numel, dtype=kind, device=p.device)

        state["step"] = torch.zeros((), dtype=torch.int64)
        state["block_steps"] = torch.zeros(nblocks, dtype=torch.int64)  # updates each block received where applied
        state["ef_residual"] = zeros()  # what this worker owes: gradients (rule mode) or weight changes (inner)
        if self.inner:
            state["rule_steps"] = torch.zeros(1, dtype=torch.int64)
            for name in config.rule_state_names():
                state[name] = zeros()
        if self.config.servers is None:
            if self.inner:  # the server copy the pushes are applied to
                state["server_value"] = p.detach().reshape(-1).clone()
            for name in config.state_names():
                state[f"outer_{name}" if self.inner else name] = zeros()
            if config.truncation_residual:
                state["truncation_residual"] = zeros()
        return state

    def _local_block(self, block_id: int) -> tuple[torch.Tensor, BlockState]:
        """In process: a block's values (the parameter, or the server copy) and its state on the 'shard'."""
        block = self.layout.blocks[block_id]
        config = rule_config_from_group(self.param_groups[self._group_of[block.param_index]])
        state = self._param_state(block.param_index)
        start, end = block.offset, block.offset + block.numel
        index = block.offset // self.layout.block_size
        values = state["server_value"] if self.inner else self._params[block.param_index].data.view(-1)
        prefix = "outer_" if self.inner else ""
        return values[start:end], BlockState(
            {name: state[prefix + name][start:end] for name in config.state_names()},
            state["block_steps"][index : index + 1],
            state["truncation_residual"][start:end] if config.truncation_residual else None,
        )

    def _residual_blocks(self) -> list[torch.Tensor]:
        return self.layout.block_views([self._param_state(i)["ef_residual"] for i in range(len(self._params))])

    def _param_blocks(self) -> list[torch.Tensor]:
        return self.layout.block_views([p.data.view(-1) for p in self._params])

    def _copy_into_params(self, blocks: Sequence[PulledBlock]) -> None:
        if self._staging is not None:
            self._staging.to_device(blocks, self._param_blocks())
            return
        views = self._param_blocks()
        for pulled in blocks:
            views[pulled.block_id].copy_(pulled.values)

    @torch.no_grad()
    def _land(self, blocks: Sequence[PulledBlock]) -> None:
        """Bring changed blocks into the parameters: as they are (rule mode), or as ``pulled + residual``.

        Under an inner ranger rule the Lookahead slow weights move with the view, so a sync pulls the
        view towards this worker's own slow trajectory, never back to weights the cluster moved past.
        """
        if not blocks:
            return
        if not self.inner:
            self._copy_into_params(blocks)
            return
        views = self._param_blocks()
        residuals = self._residual_blocks()
        slows = self._slow_blocks()
        ids = [b.block_id for b in blocks]
        for block_id in ids:
            slow = slows[block_id]
            if slow is not None:
                slow.sub_(views[block_id])
        self._copy_into_params(blocks)
        for block_id in ids:
            views[block_id].add_(residuals[block_id])
            slow = slows[block_id]
            if slow is not None:
                slow.add_(views[block_id])

    def _slow_blocks(self) -> list[torch.Tensor | None]:
        """Each block's Lookahead slow weights (None where its parameter's rule keeps none)."""
        out: list[torch.Tensor | None] = []
        for block in self.layout.blocks:
            slow = self._param_state(block.param_index).get("slow_buffer")
            out.append(None if slow is None else slow[block.offset : block.offset + block.numel])
        return out

    # -- the step ------------------------------------------------------------------------------------

    def _check_cluster_rule(self) -> None:
        configs = {rule_config_from_group(g) for g in self.param_groups}
        if configs != {self._cluster_rule}:
            raise RuntimeError(
                "the rule settings changed after registration (e.g. an lr scheduler); with servers they are "
                "fixed for the cluster: " + "; ".join(self._cluster_rule.differences(next(iter(configs))))
            )

    def _gradients(self, states: Sequence[dict[str, Any]]) -> tuple[list[torch.Tensor], list[bool]]:
        """This step's gradients, flat, in state dtype, centralized where asked (never the user's ``.grad``)."""
        grads: list[torch.Tensor] = []
        has_grad: list[bool] = []
        for p, s, group in zip(self._params, states, self._group_of, strict=True):
            has_grad.append(p.grad is not None)
            if p.grad is None:
                grads.append(torch.zeros_like(s["ef_residual"]))
                continue
            g = p.grad.detach().to(s["ef_residual"].dtype, copy=True)
            if self.param_groups[group]["use_gc"]:
                centralize_(g)
            grads.append(g.reshape(-1))
        return grads, has_grad

    def _choose(self, step: int, has_grad: Sequence[bool]) -> list[int]:
        chosen = choose_blocks(
            self.layout.num_blocks,
            density_at(step, self.selection),
            seed=self.selection.seed,
            worker_id=self.backend.worker_id,
            step=step,
        )
        return [b for b in chosen if has_grad[self.layout.blocks[b].param_index]]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step: update (inner rule, or on the servers), push chosen blocks, land what changed."""
        if self.observer:
            raise RuntimeError("an observer Ranger only pulls; step() is not allowed")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.config.servers is not None:
            self._check_cluster_rule()
        self.synchronize()  # overlap: the previous push's pull lands before this step reads the weights
        states = [self._param_state(i) for i in range(len(self._params))]
        self._steps = step = int(states[0]["step"]) + 1 if states else 1
        for s in states:
            s["step"].fill_(step)
        grads, has_grad = self._gradients(states)
        if self.inner:
            self._inner_step(states, grads, has_grad, step)
        else:
            self._rule_step(states, grads, has_grad, step)
        return loss

    def _rule_step(
        self, states: list[dict[str, Any]], grads: list[torch.Tensor], has_grad: list[bool], step: int
    ) -> None:
        """The classic mode: push gradients (with error feedback) for the rule to run where the weights live."""
        chosen = self._choose(step, has_grad)
        self.last_chosen = chosen
        feedback = ErrorFeedback(self.layout, [s["ef_residual"] for s in states], enabled=self.selection.error_feedback)
        pushed = feedback.select(grads, chosen)
        owed = self._residual_blocks() if self.selection.error_feedback else None
        blocks = []
        for block_id, values in zip(chosen, pushed, strict=True):
            outgoing = self._outgoing(block_id, values)
            if owed is not None:  # what rounding to the push dtype loses waits in the memory
                owed[block_id].add_(values.sub_(dequantize_outgoing(outgoing, values)))
            blocks.append(outgoing)
        self._push(blocks, steps=1)

    def _outgoing(self, block_id: int, values: torch.Tensor) -> OutgoingBlock:
        """A block as pushed, in the push dtype (by default the parameter's own)."""
        quantized = quantize(values, self.config.push_dtype or self.layout.blocks[block_id].dtype)
        return OutgoingBlock(block_id, quantized.payload.detach().to("cpu"), quantized.scale or 0.0)

    def _inner_step(
        self, states: list[dict[str, Any]], grads: list[torch.Tensor], has_grad: list[bool], step: int
    ) -> None:
        """The inner rule on this worker's view, then every ``local_steps`` steps a push of its residual."""
        trained = [i for i, ok in enumerate(has_grad) if ok]
        configs = self._param_configs()
        by_config: dict[RuleConfig, list[int]] = {}
        for i in trained:
            by_config.setdefault(configs[i], []).append(i)
        views = [self._params[i].data.view(-1) for i in range(len(self._params))]
        before = {i: views[i].clone() for i in trained}
        for config, members in by_config.items():
            inner = dataclasses.replace(config, lr=config.lr * config.inner_lr_scale)
            rule_states = [
                BlockState({n: states[i][n] for n in config.rule_state_names()}, states[i]["rule_steps"])
                for i in members
            ]
            # RAdam's rectification and bias correction need the cluster's clock with several workers
            # (each worker's own count would keep it in its warm-up); Lookahead counts own steps.
            clock = step * config.num_workers if config.rule == "ranger" and config.num_workers > 1 else None
            apply_update(inner, [views[i] for i in members], [grads[i] for i in members], rule_states, step=clock)
        residuals = [states[i]["ef_residual"] for i in trained]
        if trained:
            torch._foreach_add_(residuals, [views[i] for i in trained])
            torch._foreach_sub_(residuals, [before[i] for i in trained])
        if step % self.selection.local_steps:
            return
        push = step // self.selection.local_steps
        chosen = self._choose(push, has_grad)
        self.last_chosen = chosen
        owed = self._residual_blocks()
        blocks = []
        for block_id in chosen:
            outgoing = self._outgoing(block_id, owed[block_id])
            owed[block_id].sub_(dequantize_outgoing(outgoing, owed[block_id]))
            blocks.append(outgoing)
        if not self.selection.error_feedback:  # the seed's plain random drop: what was not pushed is lost
            param_blocks = self._param_blocks()
            picked = set(chosen)
            for block_id, residual in enumerate(owed):
                if block_id not in picked:
                    param_blocks[block_id].sub_(residual)
                    residual.zero_()
        self._push(blocks, steps=self.selection.local_steps)

    def _push(self, blocks: list[OutgoingBlock], *, steps: int) -> None:
        self.pushes += 1
        self.backend.exchange(blocks, steps)
        if not self.backend.overlap:
            self.synchronize()


def dequantize_outgoing(block: OutgoingBlock, like: torch.Tensor) -> torch.Tensor:
    """What the shards will add for a pushed block, in the dtype and on the device of ``like``."""
    return dequantize(Quantized(block.payload, block.scale or None), like.dtype).to(like.device)


def _signature() -> inspect.Signature:
    """``Ranger(params, lr, momentum, *, <every setting>, security)``, for ``help()`` and editors."""
    by_key = spec_by_key(RangerConfig)
    parameters = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("lr", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=1e-3),
        inspect.Parameter("momentum", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=0.0),
    ]
    for key, spec in by_key.items():
        if key not in ("lr", "momentum"):
            parameters.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=spec.default))
    parameters.append(inspect.Parameter("security", inspect.Parameter.KEYWORD_ONLY, default=None))
    return inspect.Signature(parameters)


Ranger.__init__.__signature__ = _signature()  # type: ignore[attr-defined]
Ranger.__doc__ = (Ranger.__doc__ or "") + _keyword_docs()

__all__ = ["GROUP_KEYS", "Ranger", "rule_config_from_group"]
