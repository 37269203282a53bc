"""``--lr-schedule``: its grammar, and the scheduler a job builds, step by step against torch's own."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR, StepLR

from ranger_ps.config.train import LrSchedule, TrainConfig
from ranger_ps.errors import UserError
from ranger_ps.optim import Ranger
from ranger_ps.workloads.job import lr_scheduler
from tests.conftest import ServerFactory

FORMS = "(constant, cosine[:warmup=STEPS][,min=FACTOR] or step:every=EPOCHS[,gamma=G])"


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def _lrs_and_weights(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, scheduler: LRScheduler | None, steps: int
) -> tuple[list[list[float]], list[torch.Tensor]]:
    """Train ``steps`` steps on fixed data, stepping the scheduler after each; the lr of every step."""
    generator = torch.Generator().manual_seed(1)
    used = []
    for _ in range(steps):
        x, y = torch.randn(8, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
        used.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return used, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("text", "reference"),
    [
        (
            "cosine:warmup=4,min=0.1",
            lambda opt: SequentialLR(
                opt,
                [LinearLR(opt, start_factor=1 / 5, total_iters=4), CosineAnnealingLR(opt, T_max=16, eta_min=0.01)],
                milestones=[4],
            ),
        ),
        ("cosine", lambda opt: CosineAnnealingLR(opt, T_max=20)),
        ("step:every=2,gamma=0.5", lambda opt: StepLR(opt, step_size=2 * 4, gamma=0.5)),  # 4 steps an epoch
        ("step:every=1", lambda opt: StepLR(opt, step_size=4)),
    ],
)
def test_the_schedule_on_ranger_equals_torch_schedulers_on_sgd(text: str, reference: object) -> None:
    """Ranger (in process, the sgd rule) under the job's scheduler takes the lr and the weights torch's
    SGD takes under torch's schedulers, step by step."""
    config = TrainConfig(lr_schedule=text, epochs=5)
    mine_model, torch_model = _model(), _model()
    mine = Ranger(mine_model.parameters(), rule="sgd", lr=0.1, momentum=0.9)
    theirs = torch.optim.SGD(torch_model.parameters(), lr=0.1, momentum=0.9)
    mine_lrs, mine_weights = _lrs_and_weights(mine, mine_model, lr_scheduler(mine, config, planned=20), 20)
    torch_lrs, torch_weights = _lrs_and_weights(theirs, torch_model, reference(theirs), 20)  # type: ignore[operator]
    assert sum(mine_lrs, []) == pytest.approx(sum(torch_lrs, []), rel=1e-12)
    assert len({lrs[0] for lrs in mine_lrs}) > 2  # the lr moved
    for a, b in zip(mine_weights, torch_weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_cosine_with_warm_up_follows_its_formula_per_param_group() -> None:
    """Warm-up from lr / (warmup + 1), then half a cosine to min x lr; each group relative to its own lr."""
    model = _model()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    groups: list[dict[str, object]] = [{"params": first, "lr": 0.2}, {"params": second}]
    optimizer = Ranger(groups, rule="sgd", lr=0.05)
    warmup, planned, lowest = 3, 13, 0.25
    scheduler = lr_scheduler(optimizer, TrainConfig(lr_schedule=f"cosine:warmup={warmup},min={lowest}"), planned)
    used, _ = _lrs_and_weights(optimizer, model, scheduler, planned)
    for step, lrs in enumerate(used):
        if step < warmup:
            factor = (step + 1) / (warmup + 1)
        else:
            factor = lowest + (1 - lowest) * (1 + math.cos(math.pi * (step - warmup) / (planned - warmup))) / 2
        assert lrs == pytest.approx([0.2 * factor, 0.05 * factor], rel=1e-12), step
    assert used[warmup] == pytest.approx([0.2, 0.05])  # the peak, right after the warm-up


def test_constant_builds_no_scheduler() -> None:
    optimizer = Ranger(_model().parameters(), rule="sgd", lr=0.1)
    assert lr_scheduler(optimizer, TrainConfig(), planned=10) is None
    assert TrainConfig().lr_schedule == "constant"


def test_a_warm_up_as_long_as_the_run_is_refused() -> None:
    optimizer = Ranger(_model().parameters(), rule="sgd", lr=0.1)
    with pytest.raises(UserError, match=r"--lr-schedule cosine:warmup=10: the warm-up of 10 steps does not end"):
        lr_scheduler(optimizer, TrainConfig(lr_schedule="cosine:warmup=10"), planned=10)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("constant", LrSchedule("constant")),
        ("cosine", LrSchedule("cosine")),
        ("cosine:warmup=100", LrSchedule("cosine", warmup=100)),
        ("cosine:min=0.1, warmup=5", LrSchedule("cosine", warmup=5, min_factor=0.1)),
        ("step:every=3", LrSchedule("step", every=3)),
        ("step:gamma=0.5,every=1", LrSchedule("step", every=1, gamma=0.5)),
    ],
)
def test_the_forms_the_grammar_takes(text: str, parsed: LrSchedule) -> None:
    assert LrSchedule.parse(text) == parsed
    assert TrainConfig(lr_schedule=text).to_dict()["lr_schedule"] == text  # the report keeps it as given


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("linear", f"--lr-schedule must be {FORMS[1:-1]}, got 'linear'"),
        ("cosine:", f"--lr-schedule must be {FORMS[1:-1]}, got 'cosine:'"),
        ("step", f"--lr-schedule 'step': step needs every=EPOCHS {FORMS}"),
        ("constant:warmup=3", f"--lr-schedule 'constant:warmup=3': constant does not take 'warmup=3' {FORMS}"),
        ("cosine:warmup", f"--lr-schedule 'cosine:warmup': cosine expects KEY=VALUE, not 'warmup' {FORMS}"),
        ("cosine:min=0.1,min=0.2", f"--lr-schedule 'cosine:min=0.1,min=0.2': cosine repeats 'min=0.2' {FORMS}"),
        ("cosine:warmup=1.5", "--lr-schedule 'cosine:warmup=1.5': warmup must be an integer, got '1.5'"),
        ("cosine:warmup=-1", "--lr-schedule 'cosine:warmup=-1': warmup must be >= 0 steps"),
        ("cosine:min=nan", "--lr-schedule 'cosine:min=nan': min must be a number, got 'nan'"),
        ("cosine:min=1.5", "--lr-schedule 'cosine:min=1.5': min must be in [0, 1] (a fraction of --lr)"),
        ("step:every=0", "--lr-schedule 'step:every=0': every must be >= 1 epoch"),
        ("step:every=2,gamma=0", "--lr-schedule 'step:every=2,gamma=0': gamma must be in (0, 1]"),
    ],
)
def test_a_bad_schedule_names_the_flag_and_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(UserError) as info:
        TrainConfig(lr_schedule=text)
    assert str(info.value) == message


def test_a_schedule_under_the_rule_outer_mode_is_refused() -> None:
    with pytest.raises(UserError, match=r"^--lr-schedule 'cosine' needs an inner rule \(--outer mean, sum or sgd\)"):
        TrainConfig(lr_schedule="cosine", outer="rule")
    assert TrainConfig(outer="rule").lr_schedule == "constant"  # the default stays allowed


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_worker_trains_under_its_schedule(start_servers: ServerFactory) -> None:
    """A worker applies ``--lr-schedule``: with the lr decayed to almost nothing after the first epoch,
    its weights after the second epoch are those after the first (a constant lr moves them on)."""
    from ranger_ps.worker.train import train

    def per_epoch_losses(schedule: str) -> list[float]:
        losses: list[float] = []
        config = TrainConfig(
            epochs=2, lr=0.05, momentum=0.0, lr_schedule=schedule, overlap=False, block_size=4096, connect_timeout=5.0
        )
        train(config, start_servers(1), on_eval=lambda step, pushed, evaluation: losses.append(evaluation.test_loss))
        return losses

    decayed = per_epoch_losses("step:every=1,gamma=1e-12")
    constant = per_epoch_losses("constant")
    assert decayed[0] == pytest.approx(constant[0], abs=1e-6)  # the same first epoch
    assert decayed[1] == pytest.approx(decayed[0], abs=1e-5)  # then (almost) no lr: (almost) no change
    assert abs(constant[1] - constant[0]) > 1e-3
