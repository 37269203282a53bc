"""What a training worker does: the job (model, data, epochs), the algorithm, the connection.

Field names are the CLI flags (``--push-fraction``), the ``RANGER_PS_*`` variables, the keys of
``--config`` files and of a report's ``config``, and (for the algorithm) the keywords of
:class:`ranger_ps.Ranger`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ranger_ps.algorithm.selection import check_fraction
from ranger_ps.config.client import ConnectionSettings
from ranger_ps.config.optimizer import OptimizerConfig
from ranger_ps.errors import UserError
from ranger_ps.settings import Settings, message_with_flag, redefault, setting, spec_by_key, specs, to_plain

LR_SCHEDULE_FORMS = "constant, cosine[:warmup=STEPS][,min=FACTOR] or step:every=EPOCHS[,gamma=G]"
"""The forms ``--lr-schedule`` accepts, as its help and its errors show them."""

_SCHEDULE_KEYS = {"constant": (), "cosine": ("warmup", "min"), "step": ("every", "gamma")}


@dataclass(frozen=True)
class LrSchedule:
    """A parsed ``--lr-schedule``: how the learning rate moves over one worker's planned steps.

    Every factor multiplies the rule's ``--lr``. Warm-up and cosine count optimizer steps; ``step``
    counts epochs, as ``torch.optim.lr_scheduler.StepLR`` does in a loop that steps it once per
    epoch (the decay falls on epoch boundaries).

    Attributes:
        kind: ``constant``, ``cosine`` or ``step``.
        warmup: cosine: steps of linear warm-up from ``lr / (warmup + 1)`` up to ``lr`` (0: none).
        min_factor: cosine: the lr at the end of the run as a fraction of ``lr``, in [0, 1] (torch's
            ``CosineAnnealingLR`` ``eta_min``, relative).
        every: step: epochs between decays (>= 1).
        gamma: step: the factor of each decay, in (0, 1].
    """

    kind: str
    warmup: int = 0
    min_factor: float = 0.0
    every: int = 0
    gamma: float = 0.1

    @classmethod
    def parse(cls, text: str) -> LrSchedule:
        """Parse ``constant``, ``cosine:warmup=100,min=0.1``, ``step:every=3,gamma=0.5`` and the like.

        Raises:
            ValueError: a form, key or value outside the grammar (the message names the accepted forms).
        """
        if not isinstance(text, str):
            raise ValueError(f"lr_schedule must be text ({LR_SCHEDULE_FORMS}), got {text!r}")
        kind, colon, rest = text.strip().partition(":")
        if kind not in _SCHEDULE_KEYS or (colon and not rest):
            raise ValueError(f"lr_schedule must be {LR_SCHEDULE_FORMS}, got {text!r}")
        values: dict[str, str] = {}
        for item in rest.split(",") if rest else ():
            key, equals, value = (part.strip() for part in item.partition("="))
            if key not in _SCHEDULE_KEYS[kind] or not equals or key in values:
                problem = "repeats" if key in values else "does not take" if equals else "expects KEY=VALUE, not"
                raise ValueError(f"lr_schedule {text!r}: {kind} {problem} {item.strip()!r} ({LR_SCHEDULE_FORMS})")
            values[key] = value
        if kind == "step" and "every" not in values:
            raise ValueError(f"lr_schedule {text!r}: step needs every=EPOCHS ({LR_SCHEDULE_FORMS})")
        schedule = cls(
            kind,
            warmup=_schedule_number(text, values, "warmup", int, 0),
            min_factor=_schedule_number(text, values, "min", float, 0.0),
            every=_schedule_number(text, values, "every", int, 0),
            gamma=_schedule_number(text, values, "gamma", float, 0.1),
        )
        if schedule.warmup < 0:
            raise ValueError(f"lr_schedule {text!r}: warmup must be >= 0 steps")
        if not 0 <= schedule.min_factor <= 1:
            raise ValueError(f"lr_schedule {text!r}: min must be in [0, 1] (a fraction of --lr)")
        if kind == "step" and schedule.every < 1:
            raise ValueError(f"lr_schedule {text!r}: every must be >= 1 epoch")
        if not 0 < schedule.gamma <= 1:
            raise ValueError(f"lr_schedule {text!r}: gamma must be in (0, 1]")
        return schedule


def _schedule_number(text: str, values: dict[str, str], key: str, kind: type[float], default: float) -> Any:
    if key not in values:
        return default
    try:
        number = kind(values[key])
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        name = "an integer" if kind is int else "a number"
        raise ValueError(f"lr_schedule {text!r}: {key} must be {name}, got {values[key]!r}")
    return number


@dataclass(frozen=True)
class JobSettings(Settings):
    """What to train, on what, for how long."""

    title: ClassVar[str] = "the job"

    model: str = setting("mlp", "mlp, cnn, vgg, charlm, or package.module:function returning an nn.Module")
    dataset: str = setting(
        "digits",
        "digits, synthetic[:k=v,...], cifar10:DIR, mnist:DIR, text:FILE, or package.module:function "
        "returning (train, test) datasets",
    )
    epochs: int = setting(10, "passes over the training set")
    batch_size: int = setting(32, "examples per step and worker")
    subsample: float = setting(1.0, "fraction of each minibatch the gradient is computed on, in (0, 1]")
    device: str = setting("cpu", "cpu, cuda or cuda:N")
    lr_schedule: str = setting(
        "constant",
        "the lr over each worker's planned steps: constant; cosine[:warmup=STEPS][,min=FACTOR] (STEPS steps "
        "rising linearly to lr, then half a cosine down to FACTOR x lr at the end); step:every=EPOCHS[,gamma=G] "
        "(lr x G every EPOCHS epochs, at epoch boundaries; G 0.1 unless given)",
        metavar="SCHEDULE",
    )

    def __post_init__(self) -> None:
        LrSchedule.parse(self.lr_schedule)
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        check_fraction("subsample", self.subsample)
        super().__post_init__()


@dataclass(frozen=True)
class TrainConfig(ConnectionSettings, OptimizerConfig, JobSettings):
    """What a worker trains and how; ``None`` defaults are resolved at construction (the report shows
    effective values). A bad value is a :class:`~ranger_ps.errors.UserError` naming the flag."""

    overlap: bool = redefault(ConnectionSettings, "overlap", True)

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
            if self.outer == "rule" and LrSchedule.parse(self.lr_schedule).kind != "constant":
                raise ValueError(
                    f"lr_schedule {self.lr_schedule!r} needs an inner rule (--outer mean, sum or sgd): under "
                    "outer='rule' the shards run the rule and its lr is fixed for the cluster"
                )
        except ValueError as exc:
            raise UserError(message_with_flag(TrainConfig, str(exc))) from None

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`ranger_ps.Ranger` for these settings (the algorithm's)."""
        return {spec.key: getattr(self, spec.name) for spec in specs(OptimizerConfig)}

    def connection_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`ranger_ps.Ranger` for how the worker talks to the shards."""
        return {spec.key: getattr(self, spec.name) for spec in specs(ConnectionSettings)}

    def to_dict(self) -> dict[str, Any]:
        """The report's ``config``: every setting by its key."""
        return to_plain(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with settings changed by key (``rule=``, ``lr=None`` for the rule's default again)."""
        by_key = spec_by_key(TrainConfig)
        return dataclasses.replace(self, **{by_key[k].name: v for k, v in changes.items()})
