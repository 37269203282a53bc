"""What :class:`ranger_ps.Ranger` takes besides its parameters: the algorithm and how to reach a cluster."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ranger_ps.algorithm.layout import DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE
from ranger_ps.algorithm.rules import RuleConfig
from ranger_ps.algorithm.selection import SelectionConfig
from ranger_ps.config.client import ClusterSettings, ConnectionSettings
from ranger_ps.settings import Settings, setting


@dataclass(frozen=True)
class OptimizerConfig(SelectionConfig, RuleConfig):
    """The whole algorithm a worker runs: the rule and truncation, block selection, and the layout."""

    title: ClassVar[str] = "worker side of the algorithm"

    use_gc: bool = setting(None, "gradient centralization on the worker", default_text="on for ranger only")
    block_size: int = setting(DEFAULT_BLOCK_SIZE, "elements per parameter block (the unit of pushes and pulls)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_gc is None:
            object.__setattr__(self, "use_gc", self.rule == "ranger")
        if not isinstance(self.block_size, int) or not 1 <= self.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be in [1, {MAX_BLOCK_SIZE}], got {self.block_size}")
        if self.outer == "rule" and self.local_steps != 1:
            raise ValueError(
                "local_steps needs an inner rule (--outer mean, sum or sgd): the rule outer mode pushes gradients "
                "every step"
            )

    def rule_config(self) -> RuleConfig:
        """The update rule and truncation these settings ask for (what the shards apply)."""
        return RuleConfig.from_settings(self)

    def selection_config(self) -> SelectionConfig:
        """The block selection these settings ask for."""
        return SelectionConfig.from_settings(self)


@dataclass(frozen=True)
class OptimizerRole(Settings):
    """How the optimizer takes part in a cluster (Python keywords only)."""

    observer: bool = setting(False, "only pull (an evaluator or monitor); never counts as a trainer", cli=False)
    consistency: str | None = setting(
        None, "the consistency model this worker expects (async, ssp:K, bsp); none accepts the servers'", cli=False
    )
    use_uvloop: bool = setting(True, "run the client's event loop on uvloop (the CLI's --uvloop)", cli=False)

    def __post_init__(self) -> None:
        if self.observer and getattr(self, "servers", None) is None:
            raise ValueError("observer=True needs servers")
        super().__post_init__()


@dataclass(frozen=True)
class RangerConfig(OptimizerRole, ConnectionSettings, ClusterSettings, OptimizerConfig):
    """Every keyword of :class:`ranger_ps.Ranger` (but ``security``, an object, and the parameters)."""
