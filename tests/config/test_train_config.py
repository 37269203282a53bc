"""TrainConfig: per-rule defaults resolved up front, bad values named by their flags."""

from __future__ import annotations

import pytest

from ranger_ps.algorithm.rules import RuleConfig
from ranger_ps.config.train import TrainConfig
from ranger_ps.errors import UserError


def test_rule_defaults_are_resolved_so_reports_show_effective_values() -> None:
    sgd = TrainConfig()
    assert (sgd.lr, sgd.momentum, sgd.use_gc) == (0.05, 0.9, False)
    ranger = TrainConfig(rule="ranger")
    assert (ranger.lr, ranger.momentum, ranger.use_gc, ranger.betas, ranger.eps) == (
        0.02,
        0.0,
        True,
        (0.95, 0.999),
        1e-5,
    )
    adamw = TrainConfig(rule="adamw", lr=0.02)
    assert (adamw.lr, adamw.betas, adamw.eps) == (0.02, (0.9, 0.999), 1e-8)
    assert adamw.to_dict()["betas"] == [0.9, 0.999]


def test_rule_and_selection_configs_carry_every_knob() -> None:
    config = TrainConfig(
        rule="ranger", lr=0.2, weight_decay=0.1, alpha=0.4, k=3, truncate_below=1e-4, truncation_residual=True,
        clip_value=2.0, clip_norm=3.0, push_fraction=0.1, error_feedback=False, warmup_steps=5, warmup_start=0.5,
        subsample=0.5, seed=7, outer="sgd", outer_lr=0.5, num_workers=3, local_steps=4, push_dtype="int8",
    )  # fmt: skip
    rule = config.rule_config()
    assert rule == RuleConfig(
        rule="ranger", lr=0.2, weight_decay=0.1, alpha=0.4, k=3, truncate_below=1e-4, truncation_residual=True,
        clip_value=2.0, clip_norm=3.0, momentum=0.0, outer="sgd", outer_lr=0.5, outer_momentum=0.9, num_workers=3,
        push_dtype="int8",
    )  # fmt: skip
    selection = config.selection_config()
    assert (selection.push_fraction, selection.error_feedback, selection.warmup_steps) == (0.1, False, 5)
    assert (selection.warmup_start, selection.seed, config.subsample) == (0.5, 7, 0.5)
    assert (selection.local_steps, rule.push_dtype) == (4, "int8")
    kwargs = config.optimizer_kwargs()
    assert kwargs["rule"] == "ranger" and kwargs["push_fraction"] == 0.1 and kwargs["clip_norm"] == 3.0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"rule": "nope"}, "--rule must be one of"),
        ({"rule": "adamw", "momentum": 0.9}, "momentum applies to the sgd rule"),
        ({"push_fraction": 0.0}, "--push-fraction"),
        ({"subsample": 1.5}, "--subsample"),
        ({"lr": -1.0}, "--lr must be >= 0"),
        ({"clip_norm": 0.0}, "--clip-norm"),
        ({"epochs": 0}, "--epochs must be >= 1"),
        ({"betas": (0.9, 1.0)}, "--betas"),
    ],
)
def test_bad_values_are_user_errors_naming_the_flag(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(UserError, match=needle.replace("[", r"\[")):
        TrainConfig(**kwargs)  # type: ignore[arg-type]
