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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from ranger_ps.algorithm.layout import DEFAULT_BLOCK_SIZE, Layout
from ranger_ps.algorithm.rules import BlockState, RuleConfig, apply_update, state_dtype
from ranger_ps.algorithm.selection import ErrorFeedback, SelectionConfig, centralize_, choose_blocks, density_at
from ranger_ps.client.staging import PinnedStaging, needs_staging

if TYPE_CHECKING:
    from ranger_ps.client.sharded import PulledBlock, ShardedClient
    from ranger_ps.wire.security import ClientSecurity

log = logging.getLogger(__name__)

# Hyper-parameters that may differ per param group in-process (they form each group's RuleConfig).
_RULE_KEYS = (
    "rule",
    "lr",
    "momentum",
    "dampening",
    "nesterov",
    "weight_decay",
    "betas",
    "eps",
    "alpha",
    "k",
    "n_sma_threshold",
    "truncate_below",
    "truncation_residual",
    "clip_value",
    "clip_norm",
)


def rule_config_from_group(group: dict[str, Any]) -> RuleConfig:
    """The :class:`RuleConfig` a param group's hyper-parameters describe."""
    values = {key: group[key] for key in _RULE_KEYS}
    values["name"] = values.pop("rule")
    return RuleConfig(**values)


class Ranger(torch.optim.Optimizer):
    """Randomized block SGD for parameter servers, with sgd, adamw or ranger (RAdam + Lookahead) updates.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: learning rate.
        momentum: momentum of the ``sgd`` rule (the other rules take ``betas``).
        rule: ``"sgd"`` (default; exactly ``torch.optim.SGD``), ``"adamw"`` (exactly
            ``torch.optim.AdamW``) or ``"ranger"`` (RAdam + Lookahead, as the reference Ranger).
        nesterov: Nesterov momentum (``sgd``).
        dampening: momentum dampening (``sgd``).
        weight_decay: L2 penalty (``sgd``) or decoupled weight decay (``adamw``, ``ranger``).
        betas: moment decay rates; default (0.9, 0.999) for adamw, (0.95, 0.999) for ranger.
        eps: denominator term; default 1e-8 for adamw, 1e-5 for ranger.
        alpha: Lookahead step towards the slow weights (``ranger``; default 0.5).
        k: Lookahead period in updates (``ranger``; default 6).
        n_sma_threshold: SMA length above which RAdam rectifies (``ranger``; default 5).
        use_gc: gradient centralization of parameters with more than one dimension; default on
            for ``ranger`` (as the reference), off otherwise.
        push_fraction: fraction of blocks updated (pushed) per step; 1.0 = dense.
        error_feedback: keep the gradient of unchosen blocks for later steps (default on); off
            drops it. No rescaling by ``1 / push_fraction`` (see :mod:`ranger_ps.algorithm.selection`).
        warmup_steps: steps over which the push density decays geometrically from
            ``warmup_start`` to ``push_fraction`` (default 0: no warm-up).
        warmup_start: push density at the first step of the warm-up (default 1.0).
        truncate_below: zero gradient entries with ``|g|`` below this (server side; 0 = off).
        truncation_residual: keep what truncation removed and apply it later.
        clip_value: clamp gradient entries to this magnitude (None = off).
        clip_norm: cap each block's gradient L2 norm (None = off).
        block_size: elements per block (default 65,536).
        seed: seeds the random block choice (with the worker id and the step).
        servers: ``HOST:PORT`` of every shard, in shard order; None runs in-process.
        worker_id: with servers, the id to register as (default: assigned by the servers).
        overlap: with servers, ``step()`` returns as soon as the push is encoded; the push and
            the pull of the new weights run in the background and the weights are swapped in at
            the next ``zero_grad()`` (which a training loop calls right before its forward pass)
            or ``step()``, whichever comes first. Communication then overlaps whatever the loop
            does in between (loading the next batch, logging) without making gradients stale.
            Call :meth:`synchronize` to wait for the newest weights explicitly. Default off:
            ``step()`` returns with the cluster's newest weights in the parameters.
        observer: with servers, only pull (an evaluator); ``step()`` is refused.
        connect_timeout: with servers, seconds to keep retrying servers that are not up yet.
        use_uvloop: with servers, run the client's I/O loop on uvloop.
        consistency: with servers, the consistency model this worker expects (``"async"``,
            ``"ssp:K"``, ``"bsp"``); registration fails if the servers run another. None accepts
            whatever they run (the servers' ``--consistency`` decides).
        retry_timeout: with servers, how long a push or pull keeps retrying a shard that went away
            (restarting, unreachable) before giving up with a clear error.
        security: with servers, the token and TLS settings (:class:`ranger_ps.wire.security.ClientSecurity`).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        *,
        rule: str = "sgd",
        nesterov: bool = False,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        alpha: float = 0.5,
        k: int = 6,
        n_sma_threshold: float = 5.0,
        use_gc: bool | None = None,
        push_fraction: float = 1.0,
        error_feedback: bool = True,
        warmup_steps: int = 0,
        warmup_start: float = 1.0,
        truncate_below: float = 0.0,
        truncation_residual: bool = False,
        clip_value: float | None = None,
        clip_norm: float | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        seed: int = 0,
        servers: Sequence[str] | None = None,
        worker_id: int | None = None,
        overlap: bool = False,
        observer: bool = False,
        connect_timeout: float = 30.0,
        use_uvloop: bool = True,
        consistency: str | None = None,
        retry_timeout: float = 60.0,
        security: ClientSecurity | None = None,
    ) -> None:
        defaults: dict[str, Any] = dict(
            rule=rule,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            betas=betas,
            eps=eps,
            alpha=alpha,
            k=k,
            n_sma_threshold=n_sma_threshold,
            truncate_below=truncate_below,
            truncation_residual=truncation_residual,
            clip_value=clip_value,
            clip_norm=clip_norm,
            use_gc=(rule == "ranger") if use_gc is None else use_gc,
        )
        rule_config_from_group(defaults)  # validate early, with the keyword names in the message
        super().__init__(params, defaults)
        self.selection = SelectionConfig(
            push_fraction=push_fraction,
            error_feedback=error_feedback,
            warmup_steps=warmup_steps,
            warmup_start=warmup_start,
            seed=seed,
        )
        self._block_size = block_size
        self._index_params()
        self.worker_id = 0
        self.client: ShardedClient | None = None
        self.overlap = overlap
        self.observer = observer
        self.bytes_pushed_dense = 0
        self.last_chosen: list[int] = []  # block ids updated by the last step
        self._pending: Future[list[PulledBlock]] | None = None
        self._cluster_rule: RuleConfig | None = None
        self._staging: PinnedStaging | None = None
        if servers is not None:
            self._connect(
                list(servers), worker_id, connect_timeout, use_uvloop, consistency or "", retry_timeout, security
            )
        elif observer:
            raise ValueError("observer=True needs servers")

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
        if constructed and getattr(self, "client", None) is not None:
            raise RuntimeError("with servers, the parameters are fixed at registration: add_param_group is refused")
        super().add_param_group(param_group)
        if constructed:
            self._index_params()

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

    # -- cluster ----------------------------------------------------------------------------------

    def _connect(
        self,
        servers: list[str],
        worker_id: int | None,
        connect_timeout: float,
        use_uvloop: bool,
        consistency: str,
        retry_timeout: float,
        security: ClientSecurity | None,
    ) -> None:
        from ranger_ps.client.sharded import ShardedClient

        configs = {rule_config_from_group(g) for g in self.param_groups}
        if len(configs) != 1:
            raise ValueError("with servers, every param group must use the same rule settings")
        self._cluster_rule = configs.pop()
        if needs_staging(self._params):  # a model on a GPU: the wire goes through pinned host buffers
            self._staging = PinnedStaging(self.layout, [p.device for p in self._params])
        self.client = ShardedClient(
            servers,
            connect_timeout=connect_timeout,
            retry_timeout=retry_timeout,
            use_uvloop=use_uvloop,
            security=security,
        )
        try:
            self.worker_id = self.client.register(
                self.layout,
                self._cluster_rule,
                self._params,
                worker_id,
                observer=self.observer,
                consistency=consistency,
            )
            self._apply_pulled(self.client.pull().result())
        except BaseException:
            self.client.close()
            self.client = None
            raise

    def _block_views(self) -> list[torch.Tensor]:
        return self.layout.block_views([p.data.view(-1) for p in self._params])

    def _apply_pulled(self, blocks: list[PulledBlock]) -> None:
        assert self.client is not None
        if self._staging is not None:
            self._staging.to_device(blocks, self._block_views())
        else:
            self.client.apply_pulled(blocks, self._block_views())

    def synchronize(self) -> None:
        """With servers: wait for the pull in flight (``overlap=True``) and swap it in."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._apply_pulled(pending.result())

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Swap in a pull in flight (``overlap=True``), then reset the gradients as torch does."""
        self.synchronize()
        super().zero_grad(set_to_none)

    def refresh(self) -> None:
        """With servers: pull every block that moved since the last pull into the parameters."""
        if self.client is None:
            raise RuntimeError("refresh() needs servers")
        self.synchronize()
        self._apply_pulled(self.client.pull().result())

    def close(self) -> None:
        """With servers: swap in any pull in flight and close the connections."""
        if self.client is not None:
            try:
                self.synchronize()
            finally:
                self.client.close()
                self.client = None

    def __enter__(self) -> Ranger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state --------------------------------------------------------------------------------------

    def _param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state: dict[str, Any] = self.state[p]
        if not state:
            dtype = state_dtype(p.dtype)
            config = rule_config_from_group(group)
            nblocks = -(-p.numel() // self.layout.block_size)
            state["step"] = torch.zeros((), dtype=torch.int64)
            state["block_steps"] = torch.zeros(nblocks, dtype=torch.int64)
            state["ef_residual"] = torch.zeros(p.numel(), dtype=dtype, device=p.device)
            if self.client is None:
                for name in config.state_names():
                    state[name] = torch.zeros(p.numel(), dtype=dtype, device=p.device)
                if config.truncation_residual:
                    state["truncation_residual"] = torch.zeros(p.numel(), dtype=dtype, device=p.device)
        return state

    def _block_state(self, state: dict[str, Any], config: RuleConfig, offset: int, numel: int) -> BlockState:
        index = offset // self.layout.block_size
        return BlockState(
            {name: state[name][offset : offset + numel] for name in config.state_names()},
            state["block_steps"][index : index + 1],
            state["truncation_residual"][offset : offset + numel] if config.truncation_residual else None,
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
                worker_id=self.worker_id,
                step=step,
            )
            if has_grad[self.layout.blocks[b].param_index]
        ]
        self.last_chosen = chosen
        feedback = ErrorFeedback(self.layout, [s["ef_residual"] for s in states], enabled=self.selection.error_feedback)
        if self.client is None:
            self._step_local(feedback, grads, chosen, states)
        else:
            self._step_remote(feedback, grads, chosen, step)
        return loss

    def _step_local(
        self, feedback: ErrorFeedback, grads: list[torch.Tensor], chosen: list[int], states: list[dict[str, Any]]
    ) -> None:
        pushed = feedback.select(grads, chosen)
        views = self._block_views()
        configs = [rule_config_from_group(g) for g in self.param_groups]
        by_group: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], list[BlockState]]] = {}
        for block_id, grad in zip(chosen, pushed, strict=True):
            block = self.layout.blocks[block_id]
            group = self._group_of[block.param_index]
            params, block_grads, block_states = by_group.setdefault(group, ([], [], []))
            params.append(views[block_id])
            block_grads.append(grad)
            block_states.append(self._block_state(states[block.param_index], configs[group], block.offset, block.numel))
        for group, (params, block_grads, block_states) in by_group.items():
            apply_update(configs[group], params, block_grads, block_states)

    def _step_remote(self, feedback: ErrorFeedback, grads: list[torch.Tensor], chosen: list[int], step: int) -> None:
        assert self.client is not None and self._cluster_rule is not None
        configs = {rule_config_from_group(g) for g in self.param_groups}
        if configs != {self._cluster_rule}:
            raise RuntimeError(
                "the rule settings changed after registration (e.g. an lr scheduler); with servers they are "
                "fixed for the cluster: " + "; ".join(self._cluster_rule.differences(next(iter(configs))))
            )
        self.synchronize()  # overlap: the previous step's pull lands before this push
        pushed = feedback.select_flat(grads, chosen)
        if self._staging is not None:
            pushed = self._staging.to_host(pushed, chosen)
        clock = self.client.start_clock + step  # the cluster's clock: a joining worker starts where it is
        handle = self.client.push(pushed, chosen, clock=clock)
        self.bytes_pushed_dense += self.client.push_wire_bytes(None, clock=clock)
        pending = self.client.pull(after=handle)
        if self.overlap:
            self._pending = pending
            handle.add_done_callback(_log_failed_push)
        else:
            handle.result()
            self._apply_pulled(pending.result())


def _log_failed_push(future: Future[Any]) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("push failed: %s", exc)
