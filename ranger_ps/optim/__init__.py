"""``ranger_ps.Ranger``: the whole algorithm as a drop-in ``torch.optim.Optimizer``.

Without ``servers`` every step runs in-process: gradient centralization (``ranger`` rule), random
block selection with error feedback, truncation, and the update rule on the chosen blocks. With
``servers=["host:port", ...]`` the same worker-side steps run here, the chosen blocks are pushed
to the shards (which apply the very same truncation and rule code), and the new weights are pulled
back into the parameters. Either way the code the user already has works unchanged::

    optimizer = Ranger(model.parameters(), lr=0.001, momentum=0.9)

Rule state lives per parameter in ``optimizer.state`` (per-parameter tensors, sliced into per-block
views at each step), so ``state_dict()`` / ``load_state_dict()`` work as for any torch optimizer.
With servers, the rule state lives on the shards; the optimizer's own state is the error-feedback
memory and the step count.

Where the updates happen is a :class:`~ranger_ps.client.backend.Backend`: in this process
(:class:`~ranger_ps.optim.local.LocalBackend`) or on a cluster
(:class:`~ranger_ps.client.remote.RemoteBackend`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ranger_ps.algorithm.feedback import ErrorFeedback
from ranger_ps.algorithm.layout import Layout
from ranger_ps.algorithm.rules import BlockState, RuleConfig, state_dtype
from ranger_ps.algorithm.selection import centralize_, choose_blocks, density_at
from ranger_ps.client.backend import Backend, Traffic
from ranger_ps.client.sharded import ShardedClient
from ranger_ps.config.optimizer import OptimizerConfig, RangerConfig
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
        "- ``security``: with servers, the token and TLS settings (:class:`ranger_ps.wire.security.ClientSecurity`)."
    )
    return "\n    ".join(lines)


class Ranger(torch.optim.Optimizer):
    """Randomized block SGD for parameter servers, with sgd, adamw or ranger (RAdam + Lookahead) updates.

    ``Ranger(params, lr=1e-3, momentum=0.0, **settings)``: ``params`` are parameters,
    ``(name, parameter)`` pairs (``model.named_parameters()``, which keeps names in checkpoints) or
    param groups, as for any torch optimizer; ``lr`` and ``momentum`` default as in
    ``torch.optim.SGD``, which ``Ranger(model.parameters(), lr=0.001, momentum=0.9)`` equals.

    With ``overlap=True`` (and servers) ``step()`` returns as soon as the push is encoded; the push
    and the pull of the new weights run in the background and the weights are swapped in at the
    next ``zero_grad()`` (which a training loop calls right before its forward pass) or ``step()``,
    whichever comes first; :meth:`synchronize` waits for them explicitly. A push that fails in the
    background is raised there. Default off: ``step()`` returns with the cluster's newest weights.
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
        self._block_size = config.block_size
        self._index_params()
        self.observer = config.observer
        self.last_chosen: list[int] = []  # block ids updated by the last step
        self.backend: Backend
        if config.servers is not None:
            from ranger_ps.client.remote import RemoteBackend

            configs = {rule_config_from_group(g) for g in self.param_groups}
            if len(configs) != 1:
                raise ValueError("with servers, every param group must use the same rule settings")
            self._cluster_rule = configs.pop()
            self.backend = RemoteBackend(
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
        else:
            self.backend = self._local_backend()

    def _local_backend(self) -> LocalBackend:
        return LocalBackend(self.layout, self._params, self._param_configs, self._state_of_block)

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
        """With servers: wait for the pull in flight (``overlap=True``) and swap it in; raise a
        failure of an earlier overlapped push."""
        self.backend.synchronize()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Swap in a pull in flight (``overlap=True``), then reset the gradients as torch does."""
        self.synchronize()
        super().zero_grad(set_to_none)

    def refresh(self) -> None:
        """With servers: pull every block that moved since the last pull into the parameters."""
        if self.config.servers is None:
            raise RuntimeError("refresh() needs servers")
        self.backend.refresh()

    def close(self) -> None:
        """With servers: swap in any pull in flight and close the connections."""
        self.backend.close()

    def __enter__(self) -> Ranger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state --------------------------------------------------------------------------------------

    def _param_configs(self) -> list[RuleConfig]:
        configs = [rule_config_from_group(g) for g in self.param_groups]
        return [configs[g] for g in self._group_of]

    def _param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state: dict[str, Any] = self.state[p]
        if not state:
            dtype = state_dtype(p.dtype)
            config = rule_config_from_group(group)
            nblocks = -(-p.numel() // self.layout.block_size)
            state["step"] = torch.zeros((), dtype=torch.int64)
            state["block_steps"] = torch.zeros(nblocks, dtype=torch.int64)
            state["ef_residual"] = torch.zeros(p.numel(), dtype=dtype, device=p.device)
            if self.config.servers is None:
                for name in config.state_names():
                    state[name] = torch.zeros(p.numel(), dtype=dtype, device=p.device)
                if config.truncation_residual:
                    state["truncation_residual"] = torch.zeros(p.numel(), dtype=dtype, device=p.device)
        return state

    def _state_of_block(self, block_id: int) -> BlockState:
        block = self.layout.blocks[block_id]
        group = self.param_groups[self._group_of[block.param_index]]
        config = rule_config_from_group(group)
        state = self._param_state(self._params[block.param_index], group)
        index = block.offset // self.layout.block_size
        start, end = block.offset, block.offset + block.numel
        return BlockState(
            {name: state[name][start:end] for name in config.state_names()},
            state["block_steps"][index : index + 1],
            state["truncation_residual"][start:end] if config.truncation_residual else None,
        )

    # -- the step ------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step: select blocks, update them (here or on the servers), swap in new weights."""
        if self.observer:
            raise RuntimeError("an observer Ranger only pulls; step() is not allowed")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.config.servers is not None:
            configs = {rule_config_from_group(g) for g in self.param_groups}
            if configs != {self._cluster_rule}:
                raise RuntimeError(
                    "the rule settings changed after registration (e.g. an lr scheduler); with servers they are "
                    "fixed for the cluster: " + "; ".join(self._cluster_rule.differences(next(iter(configs))))
                )
        states = [self._param_state(p, self.param_groups[g]) for p, g in zip(self._params, self._group_of, strict=True)]
        step = int(states[0]["step"]) + 1 if states else 1
        for s in states:
            s["step"].fill_(step)

        grads: list[torch.Tensor] = []
        has_grad: list[bool] = []
        for p, s, group in zip(self._params, states, self._group_of, strict=True):
            has_grad.append(p.grad is not None)
            if p.grad is None:
                grads.append(torch.zeros_like(s["ef_residual"]))
                continue
            # A copy: centralization and error feedback must never touch the user's .grad.
            g = p.grad.detach().to(s["ef_residual"].dtype, copy=True)
            if self.param_groups[group]["use_gc"]:
                centralize_(g)
            grads.append(g.reshape(-1))
        chosen = [
            b
            for b in choose_blocks(
                self.layout.num_blocks,
                density_at(step, self.selection),
                seed=self.selection.seed,
                worker_id=self.backend.worker_id,
                step=step,
            )
            if has_grad[self.layout.blocks[b].param_index]
        ]
        self.last_chosen = chosen
        feedback = ErrorFeedback(self.layout, [s["ef_residual"] for s in states], enabled=self.selection.error_feedback)
        self.synchronize()  # overlap: the previous step's pull lands before this push
        pushed = feedback.select_flat(grads, chosen)
        self.backend.exchange(pushed, chosen, step)
        return loss


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

__all__ = ["GROUP_KEYS", "OptimizerConfig", "Ranger", "rule_config_from_group"]
