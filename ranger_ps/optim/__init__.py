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

from ranger_ps.algorithm.blocks import BlockSpace
from ranger_ps.algorithm.layout import Layout, running_statistics
from ranger_ps.algorithm.rules import BlockState, RuleConfig, apply_update
from ranger_ps.algorithm.selection import centralize_, choose_block_ids, density_at
from ranger_ps.algorithm.table import BlockTable
from ranger_ps.client.backend import Backend, Run, Traffic
from ranger_ps.client.sharded import ShardedClient
from ranger_ps.config.launch import SERVERS_VARIABLE, LaunchedProcess
from ranger_ps.config.optimizer import RangerConfig
from ranger_ps.optim.flat import FlatState
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


ENV_SERVERS = "env"
"""``servers="env"``: the cluster ``ranger-ps launch`` started this process for (in process when none)."""


def _from_launch(
    settings: dict[str, Any], security: ClientSecurity | None
) -> tuple[dict[str, Any], ClientSecurity | None]:
    """Resolve ``servers="env"`` from the launcher's variables: the shards, the number of workers the
    outer rule averages over (unless given), and the token (unless ``security`` is given)."""
    place = LaunchedProcess.from_environ()
    if place.servers is None:
        log.info("servers='env' and no %s: training in this process", SERVERS_VARIABLE)
        return {**settings, "servers": None}, security
    resolved = {**settings, "servers": place.servers}
    resolved.setdefault("num_workers", place.world_size)
    if security is None and place.token is not None:
        security = ClientSecurity(token=place.token)
    return resolved, security


def _synced_buffers(
    buffers: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None, config: RangerConfig
) -> list[tuple[str, torch.Tensor]]:
    """The buffers to keep consistent through the shards, named: the floating ones, with servers.

    In process there is one copy of every buffer and nothing to do. Integer buffers (BatchNorm's
    ``num_batches_tracked``) stay each worker's own.

    Raises:
        ValueError: something that is not a tensor, a trainable tensor (a parameter belongs in
            ``params``), a non-contiguous one, or servers whose settings cannot average buffers.
    """
    if buffers is None:
        return []
    named: list[tuple[str, torch.Tensor]] = []
    for index, item in enumerate(buffers):
        name, tensor = item if isinstance(item, tuple) else (f"buffers.{len(named)}", item)  # the kept ones, in order
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(
                "buffers must be tensors or (name, tensor) pairs (model.named_buffers()); "
                f"item {index} is {type(tensor).__name__}"
            )
        if tensor.requires_grad:
            raise ValueError(f"buffer {name!r} requires grad: a trainable tensor is a parameter (give it in params)")
        if not tensor.is_contiguous():
            raise ValueError(f"buffer {name!r} is not contiguous")
        if tensor.is_floating_point():
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(
                    f"buffer {name!r} holds non-finite values (a mask?): only statistics can be averaged; pass "
                    "ranger_ps.running_statistics(model) to keep just the normalization layers' ones"
                )
            named.append((str(name), tensor))
    if config.servers is None or not named:
        return []
    refusal = buffers_refusal(config.outer, truncates=config.truncates)
    if refusal is not None:
        raise ValueError(refusal)
    return named


def buffers_refusal(outer: str, *, truncates: bool) -> str | None:
    """Why buffers cannot be kept consistent through shards with these settings (None: they can)."""
    if outer != "mean":
        return f"buffers are averaged through the shards, which needs outer='mean' (the default); got outer={outer!r}"
    if truncates:
        return (
            "buffers are averaged through the shards, and the shards' truncation or clipping would change them "
            "too: truncate_below, truncation_residual, clip_value and clip_norm must be off with buffers"
        )
    return None


def _keyword_docs() -> str:
    lines = ["", "Keyword arguments (each one a setting of :class:`ranger_ps.config.optimizer.RangerConfig`):", ""]
    for spec in specs(RangerConfig):
        lines.append(f"- ``{spec.key}`` (default {spec.default_shown()}): {spec.info.help}.")
    lines.append(
        "- ``buffers``: with servers, buffers to keep consistent across workers "
        "(``ranger_ps.running_statistics(model)``: "
        "BatchNorm's running statistics), averaged through the shards like the workers' updates."
    )
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

    The optimizer keeps the parameters, what this worker owes the cluster and its rule state in flat
    buffers, one per dtype (:mod:`ranger_ps.optim.flat`): from construction on, each parameter is a
    view into them (as with DDP's buckets), so move the model (``model.to()``, ``.half()``) before
    creating the optimizer; a parameter given new storage later is refused at the next step.

    **Buffers** (BatchNorm's running statistics) are not parameters: torch optimizers never see them.
    With servers, pass ``buffers=ranger_ps.running_statistics(model)`` (or ``model.named_buffers()``
    when every floating buffer is a statistic) and those buffers are kept consistent through the
    shards: what this worker's forward passes changed is pushed with its next push and averaged like
    the updates (``outer="mean"``), and pulls bring the cluster's values back, so workers, evaluators
    and checkpoints share one set of statistics. Without it each worker keeps its own (and an
    evaluator its fresh ones). Integer buffers (``num_batches_tracked``) stay local.

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
        buffers: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None = None,
        security: ClientSecurity | None = None,
        **settings: Any,
    ) -> None:
        by_key = spec_by_key(RangerConfig)
        unknown = sorted(set(settings) - set(by_key))
        if unknown:
            raise TypeError(f"Ranger() got unexpected keyword arguments: {', '.join(unknown)}")
        if isinstance(settings.get("servers"), str) and settings["servers"].strip() == ENV_SERVERS:
            settings, security = _from_launch(settings, security)
        config = RangerConfig(**{by_key[k].name: v for k, v in {"lr": lr, "momentum": momentum, **settings}.items()})
        self.config = config
        defaults = {key: getattr(config, by_key[key].name) for key in GROUP_KEYS}
        self._configs: dict[tuple[Any, ...], RuleConfig] = {}
        super().__init__(params, defaults)
        self.selection = config.selection_config()
        self.inner = config.inner
        self.observer = config.observer
        self.pushes = 0  # pushes made so far (every step, or every local_steps steps, and flushes)
        self._chosen = torch.zeros(0, dtype=torch.int64)
        self._steps = 0
        self._closed = False  # with servers, close() left the cluster
        self._synced = _synced_buffers(buffers, config)
        self._build()
        self.backend: Backend
        if config.servers is not None:
            from ranger_ps.client.remote import RemoteBackend

            first, *others = self._group_configs()
            for other in others:
                if first.shard_differences(other):
                    where = "with servers and outer='rule'" if first.outer == "rule" else "with servers"
                    raise ValueError(
                        f"{where}, every param group must use the same rule settings the shards apply: "
                        + "; ".join(first.shard_differences(other))
                    )
            self._cluster_rule = first
            remote = RemoteBackend(
                config.servers,
                self.layout,
                self._tensors,
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
                self.flat.land(remote.first_pull)  # the cluster's weights, as they are now
                self._buffers_seen()
            except BaseException:
                remote.close()
                raise
        else:
            self.backend = self._local_backend()

    # -- parameters and buffers -------------------------------------------------------------------

    def _build(self) -> None:
        """(Re)derive the parameters, the layout and the flat buffers (parameters become views)."""
        self._params: list[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        for p in self._params:
            if not p.is_contiguous():
                raise ValueError("Ranger needs contiguous parameters")
        # Named parameters (model.named_parameters()) keep their names in the layout, so checkpoints
        # export as a state dict the model loads; plain tensors are named "group.index". Buffers kept
        # consistent through the shards follow the parameters.
        named = [
            (g["param_names"][pi] if "param_names" in g else f"{gi}.{pi}", p)
            for gi, g in enumerate(self.param_groups)
            for pi, p in enumerate(g["params"])
        ]
        self._tensors: list[torch.Tensor] = [*self._params, *(t for _, t in self._synced)]
        self.layout = Layout.from_named_tensors([*named, *self._synced], self.config.block_size)
        self._group_of = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        names = {"ef_residual"}
        if self.inner:
            names.update(n for c in self._group_configs() for n in c.rule_state_names())
        self.flat = FlatState(self.layout, self._tensors, sorted(names))
        self._scratch = self.flat.zeros()
        self._param_blocks: list[tuple[int, int]] = [(0, 0)] * len(self._tensors)  # (first block id, count)
        for block in self.layout.blocks:
            first, count = self._param_blocks[block.param_index]
            self._param_blocks[block.param_index] = (block.block_id if count == 0 else first, count + 1)
        self._views: dict[str, list[torch.Tensor]] = {}
        self._step_counters: list[torch.Tensor] = []  # each parameter's "step" state
        self._rule_states: list[BlockState] = []  # each parameter's inner rule state (views)
        self._linked: list[RuleConfig] | None = None  # the settings the state views were made for
        first_buffer = len(self._params)
        self._buffer_blocks = [torch.arange(first, first + count) for first, count in self._param_blocks[first_buffer:]]
        self._buffer_values = self.flat.param_views(self.flat.params)[first_buffer:]
        self._buffer_residuals = self.flat.param_views(self.flat.buffers["ef_residual"])[first_buffer:]
        self._buffer_last = [v.clone() for v in self._buffer_values]  # their values as this worker last saw them

    def _local_backend(self) -> LocalBackend:
        """The in-process 'shard': one table per param group over the group's blocks."""
        tables = []
        for group, config in zip(self.param_groups, self._group_configs(), strict=True):
            members = {id(p) for p in group["params"]}
            ids = [b.block_id for b in self.layout.blocks if id(self._params[b.param_index]) in members]
            if not ids:
                continue
            space = self.flat.space if len(ids) == self.layout.num_blocks else BlockSpace(self.layout, ids)
            values = [v if self.inner is False else v.clone() for v in self._slices(space, self.flat.params)]
            tables.append(BlockTable(space, config, values))
        lengths = torch.tensor([b.numel for b in self.layout.blocks], dtype=torch.int64)
        return LocalBackend(tables, lengths, hands_back=self.inner)

    def _slices(self, space: BlockSpace, buffers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The stretches of the flat ``buffers`` that ``space``'s segments cover (a group's blocks of one
        dtype are consecutive in the flat buffer of that dtype)."""
        full = self.flat.space
        out = []
        for segment in space.segments:
            first = space.ids[int(segment.positions[0])]
            start = full.start_of[first]
            out.append(buffers[full.segment_of[first]][start : start + segment.numel])
        return out

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, as torch does; refused with servers (the layout is fixed at registration)."""
        constructed = hasattr(self, "flat")
        if constructed and self.config.servers is not None:
            raise RuntimeError("with servers, the parameters are fixed at registration: add_param_group is refused")
        super().add_param_group(param_group)
        if constructed:
            kept = {p: dict(state) for p, state in self.state.items()}  # views into the old buffers, still alive
            self._build()
            self.backend = self._local_backend()
            self.state.clear()
            for p, state in kept.items():
                self.state[p].update(state)
            if kept:
                self._link()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state as torch does, into this optimizer's buffers, keeping each tensor's own dtype.

        torch casts every state tensor except ``step`` to its parameter's dtype; here the per-block
        counters are int64 and low-precision parameters keep float32 state, so the saved values are
        copied as they were saved.
        """
        # A group saved by another optimizer (torch.optim.SGD) lacks this one's settings: they keep
        # their current values, the saved ones (lr, momentum, ...) win.
        groups = [
            {**{k: v for k, v in current.items() if k != "params"}, **saved}
            for current, saved in zip(self.param_groups, state_dict["param_groups"], strict=False)
        ]
        # torch.optim.SGD keeps no step count: a parameter with saved state has taken at least one step
        # (its momentum buffer is initialized), which is what the rule needs to know.
        states = {}
        for key, saved_state in state_dict["state"].items():
            saved_state = dict(saved_state)
            if "step" not in saved_state and any(isinstance(v, torch.Tensor) for v in saved_state.values()):
                saved_state["step"] = torch.ones((), dtype=torch.int64)
            if self.inner and "rule_steps" not in saved_state and "step" in saved_state:
                saved_state["rule_steps"] = torch.as_tensor(saved_state["step"], dtype=torch.int64).reshape(1)
            states[key] = saved_state
        state_dict = {**state_dict, "param_groups": groups, "state": states}
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for saved_id, p in zip(saved_ids, self._params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.detach().clone()
        if isinstance(self.backend, LocalBackend):
            self.backend.configure(self._group_configs())
        self._link()

    def _group_configs(self) -> list[RuleConfig]:
        """Each param group's rule settings (cached by value: a schedule changes them between steps)."""
        out = []
        for group in self.param_groups:
            key = tuple(_hashable(group[k]) for k in RULE_KEYS)
            config = self._configs.get(key)
            if config is None:
                if len(self._configs) >= _CONFIG_CACHE:  # a schedule makes new settings every step
                    self._configs.clear()
                config = self._configs[key] = rule_config_from_group(group)
            out.append(config)
        return out

    def _link(self) -> None:
        """Make every parameter's ``optimizer.state`` entries views into the buffers (values loaded or
        kept there are copied in first), so ``state_dict()`` sees the live state."""
        configs = self._group_configs()
        for index, p in enumerate(self._params):
            state = self.state[p]
            state.setdefault("step", torch.zeros((), dtype=torch.int64))
            for key, view in self._state_views(index, configs[self._group_of[index]]).items():
                loaded = state.get(key)
                if loaded is not None and loaded is not view:
                    view.copy_(loaded.reshape(view.shape))
                state[key] = view
            if self.inner:
                state.setdefault("rule_steps", torch.zeros(1, dtype=torch.int64))
        self._views = {name: self.flat.param_views(buffers) for name, buffers in self.flat.buffers.items()}
        self._step_counters = [self.state[p]["step"] for p in self._params]
        self._steps = int(self._step_counters[0]) if self._step_counters else 0
        if self._step_counters:
            for counter in self._step_counters[1:]:
                counter.fill_(self._steps)
        self._rule_states = [
            BlockState(
                {n: self.state[p][n] for n in configs[self._group_of[i]].rule_state_names()},
                self.state[p]["rule_steps"],
            )
            if self.inner
            else BlockState()
            for i, p in enumerate(self._params)
        ]
        self._linked = configs

    def _state_views(self, index: int, config: RuleConfig) -> dict[str, torch.Tensor]:
        """The state a parameter shows under its settings, as views into the flat buffers and tables."""
        flat = self.flat
        segment, start, end = flat.spans[index]
        views = {"ef_residual": flat.buffers["ef_residual"][segment][start:end]}
        if self.inner:
            for name in config.rule_state_names():
                views[name] = flat.buffer(name)[segment][start:end]
        first_block, count = self._param_blocks[index]
        table = self._table_of(first_block) if count else None
        if table is None:  # with servers the shards keep the per-block counters
            views["block_steps"] = torch.zeros(count, dtype=torch.int64)
            return views
        first = int(table.space.positions(torch.tensor([first_block]))[0])
        views["block_steps"] = table.steps[first : first + count]
        t_segment, t_start, t_end = table.space.param_span(index)
        if self.inner:
            views["server_value"] = table.values[t_segment][t_start:t_end]
        for name in config.state_names():
            key = f"outer_{name}" if self.inner else name
            views[key] = table.state[name][t_segment][t_start:t_end]
        if table.residual is not None:
            views["truncation_residual"] = table.residual[t_segment][t_start:t_end]
        return views

    def _table_of(self, block_id: int) -> BlockTable | None:
        backend = getattr(self, "backend", None)
        if not isinstance(backend, LocalBackend):
            return None
        for table in backend.tables:
            if table.space.ids[0] <= block_id <= table.space.ids[-1]:
                return table
        return None

    # -- the cluster ----------------------------------------------------------------------------

    @property
    def worker_id(self) -> int:
        """The id this optimizer pushes as (assigned by the servers unless given; 0 in process)."""
        return self.backend.worker_id

    @property
    def last_chosen(self) -> list[int]:
        """Block ids the last push carried (ascending)."""
        return sorted(int(b) for b in self._chosen.tolist())

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
        if self._closed:
            return  # close() landed everything; nothing is in flight any more
        self._land(self.backend.collect())

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Land a pull in flight (``overlap=True``), then reset the gradients as torch does."""
        self.synchronize()
        super().zero_grad(set_to_none)

    def refresh(self) -> None:
        """With servers: land every block that moved since this worker last saw it."""
        if self.config.servers is None:
            raise RuntimeError("refresh() needs servers")
        self._check_open("refresh()")
        self._land(self.backend.pull_all())

    @torch.no_grad()
    def flush(self) -> None:
        """Push everything this worker still owes the cluster (its whole residual).

        With an inner rule, a worker that finishes or leaves calls this (``close()`` does), so that
        nothing it computed is thrown away; the outer rule applies to the flush as to any push (the
        default ``mean`` averages the flushes of all workers). Nothing to do under the rule mode.
        """
        if not self.inner or self.observer or self._linked is None:
            return
        self.synchronize()
        residual = self.flat.buffers["ef_residual"]
        owed = self.backend.order(self.flat.nonzero_blocks(residual))
        if len(owed):
            self._chosen = owed
            self._push(self.flat.take(residual, owed, None), steps=0)
            self.synchronize()

    def close(self) -> None:
        """Flush what this worker owes (inner rule), land what is in flight, close the connections.

        Closing twice is harmless. In process the optimizer still trains afterwards (as a torch
        optimizer would); with servers it has left the cluster, and ``step()`` says so.
        """
        if self._closed:
            return
        try:
            if self.config.servers is not None:
                self.flush()
        finally:
            self._closed = self.config.servers is not None
            self.backend.close()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(
                f"{what} after close(): this optimizer left the cluster; create a new Ranger to train on"
            )

    def __enter__(self) -> Ranger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @torch.no_grad()
    def _land(self, runs: Sequence[Run]) -> None:
        """Bring changed blocks into the parameters: as they are (rule mode), or as ``pulled + residual``.

        Under an inner ranger rule the Lookahead slow weights move with the view, so a sync pulls the
        view towards this worker's own slow trajectory, never back to weights the cluster moved past.
        """
        self._fold_buffers()
        if not runs:
            return
        if not self.inner:
            self.flat.land(runs)
            return
        buffers = self.flat.buffers
        self.flat.land(runs, residual=buffers["ef_residual"], slow=buffers.get("slow_buffer"))
        self._buffers_seen()

    def _fold_buffers(self) -> None:
        """Add what the forward passes did to the synchronized buffers since this worker last saw them
        (BatchNorm's running statistics) to what it owes the cluster, as a step's update is added."""
        if self._synced:
            torch._foreach_add_(self._buffer_residuals, torch._foreach_sub(self._buffer_values, self._buffer_last))
            self._buffers_seen()

    def _buffers_seen(self) -> None:
        if self._synced:
            torch._foreach_copy_(self._buffer_last, self._buffer_values)

    # -- the step ------------------------------------------------------------------------------------

    def _check_cluster_rule(self, configs: Sequence[RuleConfig]) -> None:
        """Refuse a change of what the shards apply (a schedule of an inner rule's settings is the worker's own)."""
        for config in configs:
            changed = self._cluster_rule.shard_differences(config)
            if changed:
                fixed = (
                    "with servers and outer='rule' the shards run the rule and its settings are fixed for the "
                    "cluster (an inner rule, outer='mean', 'sum' or 'sgd', takes schedules)"
                    if self._cluster_rule.outer == "rule"
                    else "with servers the outer and truncation settings the shards apply are fixed for the cluster"
                )
                raise RuntimeError(
                    f"the rule settings changed after registration (e.g. an lr scheduler); {fixed}: "
                    + "; ".join(changed)
                )

    def _grads(self, trained: Sequence[int], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """This step's gradients of the trained parameters, flat, in state dtype, centralized where asked
        (copies only where needed; the user's ``.grad`` is never modified)."""
        out = []
        for i in trained:
            grad = self._params[i].grad
            assert grad is not None
            dtype = like[i].dtype
            if self.param_groups[self._group_of[i]]["use_gc"]:
                g = grad.detach().to(dtype, copy=True)
                centralize_(g)
                out.append(g.reshape(-1))
            else:
                out.append(grad.detach().reshape(-1).to(dtype))
        return out

    def _choose(self, step: int, has_grad: Sequence[bool]) -> torch.Tensor:
        """This push's blocks: random ones of the trained parameters, and those of every synchronized
        buffer that changed since its last push (a buffer no forward pass moves costs nothing)."""
        chosen = choose_block_ids(
            self.layout.num_blocks,
            density_at(step, self.selection),
            seed=self.selection.seed,
            worker_id=self.backend.worker_id,
            step=step,
        )
        trained = self.flat.trained_blocks(chosen, [*has_grad, *(False for _ in self._synced)])
        owing = torch.stack([owed.any() for owed in self._buffer_residuals]).tolist() if self._synced else []
        moved = [ids for ids, owes in zip(self._buffer_blocks, owing, strict=True) if owes]  # one device sync
        if moved:
            trained = torch.cat([trained, *moved])
        return self.backend.order(trained)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step: update (inner rule, or on the servers), push chosen blocks, land what changed."""
        self._check_open("step()")
        if self.observer:
            raise RuntimeError("an observer Ranger only pulls; step() is not allowed")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.flat.check_bound(self._tensors)
        configs = self._group_configs()
        if self.config.servers is not None:
            self._check_cluster_rule(configs)
        if configs != self._linked:  # the first step, or settings changed (an lr schedule)
            if isinstance(self.backend, LocalBackend):
                self.backend.configure(configs)
            if self._linked is None or _state_shapes(configs) != _state_shapes(self._linked):
                self._link()  # the state each parameter shows depends on the rules, not on their lr
            else:
                self._linked = configs
        self.synchronize()  # overlap: the previous push's pull lands before this step reads the weights
        self._steps = step = self._steps + 1
        if self._step_counters:
            torch._foreach_add_(self._step_counters, 1)  # every parameter's "step" (all equal)
        has_grad = [p.grad is not None for p in self._params]
        trained = [i for i, ok in enumerate(has_grad) if ok]
        if self.inner:
            self._inner_step(trained, has_grad, step, configs)
        else:
            self._rule_step(trained, has_grad, step)
        return loss

    def _rule_step(self, trained: list[int], has_grad: list[bool], step: int) -> None:
        """The classic mode: push gradients (with error feedback) for the rule to run where the weights live."""
        chosen = self._choose(step, has_grad)
        self._chosen = chosen
        if self.selection.error_feedback:
            owed = self.flat.buffers["ef_residual"]
            views = self._views["ef_residual"]
        else:  # plain random dropping: this step's gradients only, the rest is lost
            owed = self._scratch
            views = self.flat.param_views(owed)
            torch._foreach_zero_(owed)
        targets = [views[i] for i in trained]
        if targets:
            torch._foreach_add_(targets, self._grads(trained, views))
        self._push(self.flat.take(owed, chosen, self.config.push_dtype), steps=1)

    def _inner_step(self, trained: list[int], has_grad: list[bool], step: int, configs: Sequence[RuleConfig]) -> None:
        """The inner rule on this worker's view, then every ``local_steps`` steps a push of its residual."""
        by_config: dict[RuleConfig, list[int]] = {}
        for i in trained:
            by_config.setdefault(configs[self._group_of[i]], []).append(i)
        params = self.flat.params
        before = self._scratch
        torch._foreach_copy_(before, params)
        views = self.flat.param_views(params)
        grads = dict(zip(trained, self._grads(trained, self._views["ef_residual"]), strict=True))
        for config, members in by_config.items():
            inner = self._inner_config(config)
            states = [self._rule_states[i] for i in members]
            # RAdam's rectification and bias correction need the cluster's clock with several workers
            # (each worker's own count would keep it in its warm-up); Lookahead counts own steps.
            clock = step * config.num_workers if config.rule == "ranger" and config.num_workers > 1 else None
            apply_update(inner, [views[i] for i in members], [grads[i] for i in members], states, step=clock)
        residual = self.flat.buffers["ef_residual"]
        torch._foreach_sub_(before, params)  # before - after: exact (the two are close)
        torch._foreach_sub_(residual, before)  # the residual grows by what the step moved
        if step % self.selection.local_steps:
            return
        chosen = self._choose(step // self.selection.local_steps, has_grad)
        self._chosen = chosen
        runs = self.flat.take(residual, chosen, self.config.push_dtype)
        if not self.selection.error_feedback:  # the seed's plain random drop: what was not pushed is lost
            self.flat.drop_unchosen(residual, chosen)
        self._push(runs, steps=self.selection.local_steps)

    def _inner_config(self, config: RuleConfig) -> RuleConfig:
        """The rule's settings for the inner step: the lr scaled by ``inner_lr_scale``."""
        key = ("inner", config)
        inner = self._configs.get(key)
        if inner is None:
            inner = self._configs[key] = dataclasses.replace(config, lr=config.lr * config.inner_lr_scale)
        return inner

    def _push(self, runs: list[Run], *, steps: int) -> None:
        self.pushes += 1
        self.backend.exchange(runs, steps)
        if not self.backend.overlap:
            self.synchronize()


RULE_KEYS: tuple[str, ...] = tuple(s.key for s in specs(RuleConfig))

_CONFIG_CACHE = 256
"""Rule settings kept by value; past this many the cache starts again (an lr schedule's every step is new)."""


def _state_shapes(configs: Sequence[RuleConfig]) -> list[tuple[tuple[str, ...], tuple[str, ...], bool]]:
    """What shapes each group's state: its rule's state names, the outer state's and whether a
    truncation residual is kept (not its lr or other numbers)."""
    return [(tuple(c.rule_state_names()), tuple(c.state_names()), bool(c.truncation_residual)) for c in configs]


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


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
    parameters.append(inspect.Parameter("buffers", inspect.Parameter.KEYWORD_ONLY, default=None))
    parameters.append(inspect.Parameter("security", inspect.Parameter.KEYWORD_ONLY, default=None))
    return inspect.Signature(parameters)


Ranger.__init__.__signature__ = _signature()  # type: ignore[attr-defined]
Ranger.__doc__ = (Ranger.__doc__ or "") + _keyword_docs()

__all__ = ["GROUP_KEYS", "Ranger", "buffers_refusal", "rule_config_from_group", "running_statistics"]
