"""ThreeDPlan and PlanCoordinator: the plan's arguments, the adaptive controller, the signal pass
against a reference, callbacks built from the example YAML, conflicts rejected before training,
all axes in one run, resume equal to the uninterrupted run, adaptive back-off, and a short real
MiniLM run that trains, converts and exports.

A small network on fixed synthetic data keeps most runs to a few seconds.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from lightning_3d.budget import AccuracyCurves, CostModel
from lightning_3d.callbacks import (
    CurriculumSampler,
    Distiller,
    PlanCoordinator,
    ProgressivePruner,
    QATHook,
    SensitivityFreezer,
)
from lightning_3d.distillation import TEACHER_KEY, distil
from lightning_3d.plan import (
    PlanBudget,
    SparsityBackoff,
    ThreeDPlan,
    freezable_units,
    signal_pass,
)
from lightning_3d.quantization import load_quantized, quantized_modules
from lightning_3d.sampling import with_curriculum
from lightning_3d.sensitivity import GradientStatistics
from lightning_3d.tasks import weighted_mean

REPO = Path(__file__).resolve().parents[1]
SAMPLES, BATCH = 64, 8
ALL_AXES = {"data_budget": 0.5, "trainable": 0.5, "sparsity": 0.5, "weight_bits": 8}
#: The single signal pass before step 1 (no warm-up), the hardest samples dropped, the freezer
#: free to freeze pruned tensors: the plan of earlier versions, still supported.
SIGNAL_PASS = {
    "warmup": 0.0,
    "data_drops": "hardest",
    "data_anneal": 0.0,
    "freeze": "any",
    "prune_end": 0.5,
}


class Items(Dataset):
    """Fixed points in 8 dimensions, labelled by the sign of the first coordinate, with their
    position under ``"index"`` (what the data axis needs)."""

    def __init__(self) -> None:
        self.x = torch.randn(SAMPLES, 8, generator=torch.Generator().manual_seed(0))
        self.labels = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "labels": self.labels[i], "index": i}


class Block(torch.nn.Module):
    def __init__(self, width_in: int, width: int) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(width_in, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))


class Net(pl.LightningModule):
    """Blocks ``layers.0`` (8 -> 32) and ``layers.1`` (32 -> 32) and a ``classifier`` head,
    returning what the data axis reads (per-sample losses, indices, logits)."""

    def __init__(self, val_acc: list[float] | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([Block(8, 32), Block(32, 32)])
        self.classifier = torch.nn.Linear(32, 2)
        self.val_acc = val_acc  # scripted validation accuracies, one per validation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x)

    def score_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self(batch["x"])
        per_sample = F.cross_entropy(logits, batch["labels"], reduction="none")
        return {"per_sample_loss": per_sample, "index": batch["index"], "logits": logits}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        outputs = self.score_batch(batch)
        loss = outputs["per_sample_loss"].mean()
        return {**{k: v.detach() for k, v in outputs.items()}, "loss": loss}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        accuracy = (self(batch["x"]).argmax(-1) == batch["labels"]).float().mean()
        if self.val_acc is not None:
            accuracy = torch.tensor(self.val_acc[min(self.current_epoch, len(self.val_acc) - 1)])
        self.log("val/acc", accuracy)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def loader() -> DataLoader:
    return DataLoader(Items(), batch_size=BATCH, shuffle=False)


def trainer_for(callbacks: list[Callback], tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "max_epochs": 4,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": tmp_path,
        **kwargs,
    }
    return pl.Trainer(callbacks=callbacks, **options)


def of_type(trainer: pl.Trainer, kind: type) -> Any:
    return next(c for c in trainer.callbacks if isinstance(c, kind))


# -- the plan (pure) -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"data_budget": 0.0}, r"data_budget must be in \(0, 1\], got 0.0"),
        ({"trainable": 1.5}, r"trainable must be in \(0, 1\], got 1.5"),
        ({"gradient_density": 0.0}, r"gradient_density must be in \(0, 1\]"),
        ({"sparsity": 0.99}, r"sparsity must be in \[0, 0.98\], got 0.99"),
        ({"weight_bits": 3}, r"weight_bits must be one of \[4, 8\] or None, got 3"),
        ({"quantization": "int8_weight_only"}, "needs weight_bits"),
        ({"data_drops": "random"}, "data_drops must be one of"),
        ({"probe_batches": 0}, "probe_batches must be >= 1"),
        ({"prune_end": 0.0}, r"need prune_end in \(0, 1\]"),
        ({"sparsity": 0.5, "weight_bits": 4, "qat_start": 0.4}, "qat_start=0.4 is before"),
        ({"mode": "best"}, "mode must be one of"),
        ({"adaptive": True}, "adaptive=True backs off sparsity; set sparsity > 0"),
        ({"sparsity": 0.5, "backoff": 1.0}, r"backoff in \(0, 1\)"),
        ({"distill": 1.5}, r"distill must be in \[0, 1\], got 1.5"),
        ({"distill": 0.5, "temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"distill": 0.5, "warmup": 0.0}, "teacher='snapshot' copies the model at the end"),
        ({"warmup": 1.0}, r"warmup must be in \[0, 1\)"),
        ({"sparsity": 0.5, "warmup": 0.6}, "prune_end=0.6 is not after warmup=0.6"),
        ({"prune_pattern": "rows"}, "prune_pattern must be one of"),
        ({"freeze": "all"}, "freeze must be one of"),
        ({"data_anneal": 1.0}, r"data_anneal must be in \[0, 1\)"),
        ({"group_by_length": -2}, r"group_by_length must be >= 0 \(0: off\), got -2"),
        ({"group_by_length": 0.5}, "group_by_length is the number of batches .* got 0.5"),
        ({"max_steps": 0}, "max_steps must be >= 1 or None"),
        ({"quantize_at": "deploy"}, "quantize_at must be one of"),
        (
            {"weight_bits": 8, "quantization": "int8_weight_only", "quantize_at": "export"},
            "a QAT preset has no effect there, got quantization='int8_weight_only'",
        ),
        ({"freeze_by": "size"}, "freeze_by must be one of"),
        (
            {"trainable": 0.5, "freeze_by": "depth", "sparsity": 0.3},
            "freeze_by='depth' measures no gradient statistics",
        ),
        ({"budget": PlanBudget(0.5), "trainable": 0.5}, "budget chooses .*got trainable=0.5"),
    ],
)
def test_bad_plan_arguments_raise_a_clear_value_error(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ThreeDPlan(**arguments)


def test_the_plan_names_its_axes_preset_steps_and_strategy_arguments() -> None:
    assert ThreeDPlan().axes == () and ThreeDPlan().preset is None
    plan = ThreeDPlan(sparsity=0.3, weight_bits=4, gradient_density=0.1)
    assert plan.axes == ("pruning", "quantization", "communication")
    assert plan.preset == "int4_weight_only"
    assert ThreeDPlan(weight_bits=8).preset == "int8_weight_only"
    custom = ThreeDPlan(weight_bits=4, quantization="int8_dynamic_act_int4_weight")
    assert custom.preset == "int8_dynamic_act_int4_weight"
    # quantized at export: the axis is on, but no QATHook trains it and pruning may end last
    export = ThreeDPlan(sparsity=0.3, weight_bits=8, quantize_at="export", qat_start=0.2)
    assert export.axes == ("pruning", "quantization") and export.preset is None
    assert [type(c).__name__ for c in export.callbacks()] == [
        "PlanCoordinator",
        "ProgressivePruner",
    ]
    assert plan.step_of(0.5, 41) == 20 and plan.strategy_arguments() == {"density": 0.1}
    with pytest.raises(ValueError, match="known length"):
        plan.step_of(0.5, float("inf"))
    with pytest.raises(ValueError, match="kind must be one of"):
        plan.strategy("tp")


def test_grouping_by_length_alone_turns_the_data_axis_on_without_scoring_first() -> None:
    plan = ThreeDPlan(group_by_length=20, warmup=0)
    assert plan.axes == ("data",)
    coordinator, curriculum = plan.callbacks()
    assert isinstance(coordinator, PlanCoordinator) and isinstance(curriculum, CurriculumSampler)
    assert curriculum.state.length_window == 20
    assert curriculum.schedule.budget == 1.0 and not curriculum.prescore  # nothing dropped
    assert not curriculum.rescale_loss and curriculum.anneal == 0.0
    dropping = ThreeDPlan(data_budget=0.7, group_by_length=20, warmup=0).callbacks()[1]
    assert dropping.prescore and dropping.rescale_loss and dropping.state.length_window == 20


def test_a_budget_plan_takes_the_solvers_strengths_and_the_trainer_must_follow(tmp_path) -> None:
    cost = CostModel(forward_s=1.0, backward_s=2.0, optimizer_s=1.0)  # 4 s a dense step
    candidates = {"data_budget": [1.0], "trainable": [1.0, 0.5], "sparsity": [0.0],
                  "weight_bits": [None, 8], "distill": [0.0], "steps": [1.0, 0.5]}  # fmt: skip
    plan = ThreeDPlan.for_budget(
        0.6, 0.3, cost=cost, reference_steps=32, epochs=4, compressible_share=0.5,
        candidates=candidates, warmup=0.0,
    )  # fmt: skip
    allocation = plan.allocation
    assert allocation is not None and allocation.time_fraction <= 0.6
    # int8 is the only way to 0.3 of the size; half the steps the only way to 0.6 of the time
    assert (plan.weight_bits, allocation.steps, plan.max_steps) == (8, 0.5, 16)
    assert plan.trainer_arguments() == {"max_steps": 16} and plan.warmup == 0.0
    with pytest.raises(ValueError, match=r"time=0\.05 cannot be met"):
        ThreeDPlan.for_budget(0.05, None, cost=cost, reference_steps=32, epochs=4,
                              compressible_share=0.5, candidates=candidates)  # fmt: skip
    with pytest.raises(ValueError, match="solve it first"):
        ThreeDPlan(budget=PlanBudget(0.5)).callbacks()
    with pytest.raises(ValueError, match="budget time must be > 0"):
        PlanBudget(0.0)
    # the coordinator refuses a trainer that does not run the plan's steps, before step 1
    with pytest.raises(ValueError, match="max_steps=16 optimizer steps but the trainer has"):
        trainer = trainer_for(plan.callbacks(), tmp_path)
        trainer.fit(Net(), with_curriculum(trainer, loader()))
    # with them, it logs the predicted training time before training and the measured after
    logger = CSVLogger(tmp_path, name="budget")
    trainer = trainer_for(plan.callbacks(), tmp_path, logger=logger, **plan.trainer_arguments())
    trainer.fit(Net(), with_curriculum(trainer, loader()))
    assert trainer.global_step == 16
    with open(next(tmp_path.glob("budget/version_*/metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    predicted = [float(r["plan/predicted_train_s"]) for r in rows if r["plan/predicted_train_s"]]
    measured = [float(r["plan/measured_train_s"]) for r in rows if r["plan/measured_train_s"]]
    assert predicted == [pytest.approx(allocation.time_s)] and len(measured) == 1
    assert measured[0] > 0
    # the same budget from a calibration file, through solve()
    calibration = tmp_path / "cost.json"
    cost.save(calibration)
    budgeted = ThreeDPlan(budget=PlanBudget(0.6, 0.3, calibration=str(calibration)), warmup=0.0)
    solved = budgeted.solve(Net(), reference_steps=32, epochs=4)
    assert solved.budget is None and solved.allocation is not None
    assert solved.allocation.time_fraction <= 0.6 and solved.allocation.size_fraction <= 0.3
    # batches grouped by length make a step compute a quarter of the tokens (0.25 * 3 + 1 =
    # 1.75 s instead of 4 s, the optimizer unchanged): 0.6 of the time then fits every step
    grouped = ThreeDPlan.for_budget(
        0.6, 0.3, cost=cost, reference_steps=32, epochs=4, compressible_share=0.5,
        candidates=candidates | {"steps": [1.0, 0.5]}, warmup=0.0, token_share=0.25,
        group_by_length=8,
    )  # fmt: skip
    assert grouped.max_steps is None and grouped.group_by_length == 8
    assert grouped.allocation is not None and grouped.allocation.steps == 1.0
    with pytest.raises(ValueError, match=r"token_share=0\.25 prices batches grouped by length"):
        ThreeDPlan.for_budget(0.6, 0.3, cost=cost, reference_steps=32, epochs=4,
                              compressible_share=0.5, token_share=0.25)  # fmt: skip


def test_the_solver_prices_the_trainable_share_the_freezer_reaches() -> None:
    """A 90% embedding cannot be half frozen: asking for 50% trainable freezes it whole."""
    model = torch.nn.ModuleDict(
        {
            "embed": torch.nn.Embedding(100, 8),  # 800
            "layers": torch.nn.ModuleList([torch.nn.Linear(8, 8)]),  # 64 + 8
            "base": torch.nn.Linear(8, 8),  # frozen (a LoRA base): not counted
            "classifier": torch.nn.Linear(8, 2),  # 18: the head, always trains
        }
    )
    model["base"].requires_grad_(False)
    units, units_unpruned = freezable_units(model)
    assert units == pytest.approx([800 / 890, 64 / 890, 8 / 890])  # in model order
    assert units_unpruned == pytest.approx([800 / 890, 8 / 890])  # the pruned weight stays
    cost = CostModel(forward_s=1.0, backward_s=2.0, optimizer_s=1.0)  # 4 s a dense step
    candidates = {"data_budget": [1.0], "trainable": [1.0, 0.5], "sparsity": [0.0],
                  "weight_bits": [None], "distill": [0.0], "steps": [1.0]}  # fmt: skip
    curves = AccuracyCurves({"trainable": {0.1: -1.0}})
    plan = ThreeDPlan.for_budget(
        0.9, None, cost=cost, reference_steps=32, epochs=4, compressible_share=64 / 890,
        candidates=candidates, warmup=0.0, curves=curves, freezable=(units, units_unpruned),
    )  # fmt: skip
    allocation = plan.allocation
    assert allocation is not None and plan.trainable == 0.5
    reached = (18 + 64 + 8) / 890  # the head and both small tensors: the embedding is frozen
    assert allocation.trainable_reached == pytest.approx(reached)
    # linear between (0.1, -1) and (1, 0); the step priced at the reached share (w = 0.5)
    assert allocation.accuracy_change == pytest.approx(-1.0 + (reached - 0.1) / 0.9)
    step = 1.0 + 2.0 * (1 - 0.5 * (1 - reached)) + 1.0 * reached
    assert allocation.time_s == pytest.approx(32 * step)


def test_sparsity_backoff_follows_the_running_best_and_its_margin() -> None:
    controller = SparsityBackoff(margin=0.02, backoff=0.5)
    values = [0.70, 0.75, 0.74, 0.72, 0.76, 0.70]  # best 0.70, 0.75, -, (reset) 0.76, -
    sparsity, targets = 0.8, []
    for step, value in enumerate(values):
        new = controller.observe(value, sparsity, step)
        sparsity = sparsity if new is None else new
        targets.append(sparsity)
    # 0.74 and 0.72 are within / 0.03 beyond 0.02 of 0.75; 0.70 is 0.06 below 0.76
    assert targets == [0.8, 0.8, 0.8, 0.4, 0.4, 0.2]
    assert [d["step"] for d in controller.decisions] == [3, 5]
    assert controller.decisions[1]["old_sparsity"] == 0.4 and controller.best is None
    assert controller.decisions[1]["best"] == 0.76
    lower = SparsityBackoff(margin=0.1, backoff=0.25, mode="min")
    assert lower.observe(1.0, 0.8, 0) is None and lower.observe(0.9, 0.8, 1) is None
    assert lower.observe(0.95, 0.8, 2) is None and lower.observe(1.2, 0.8, 3) == 0.2
    assert "above the best 0.9000" in lower.decisions[0]["reason"]
    copy = SparsityBackoff()
    copy.load_state_dict(controller.state_dict())
    assert copy.best == controller.best and copy.decisions == controller.decisions


def test_signal_pass_matches_statistics_fed_the_same_gradients() -> None:
    net = Net()
    batches = list(loader())
    params = dict(net.named_parameters())
    reference = GradientStatistics()
    for batch in batches[:3]:
        net.zero_grad()
        net.score_batch(batch)["per_sample_loss"].mean().backward()
        reference.update({n: p.grad.clone() for n, p in params.items()})
    net.zero_grad(set_to_none=True)
    statistics, recorded = GradientStatistics(), []
    done = signal_pass(
        net.score_batch,
        batches,
        params,
        statistics,
        gradient_batches=3,
        record=lambda outputs, batch: recorded.append(outputs["index"]),
    )
    assert done == 3 and statistics.steps == 3
    assert torch.equal(torch.cat(recorded), torch.arange(SAMPLES))  # every sample scored once
    assert all(p.grad is None for p in params.values())
    for name in params:
        torch.testing.assert_close(statistics.fisher(name), reference.fisher(name))
        torch.testing.assert_close(statistics.mean(name), reference.mean(name))
    with pytest.raises(RuntimeError, match="needs score_batch"):
        signal_pass(lambda b: {"logits": net(b["x"])}, batches, params, statistics, 1)


# -- built from YAML ---------------------------------------------------------------------------
def test_the_example_yaml_builds_the_plans_callbacks_before_the_users(tmp_path) -> None:
    from lightning_3d.cli import Lightning3DCLI

    config = REPO / "examples" / "configs" / "rt_minilm_3d.yaml"
    cli = Lightning3DCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=[
            "--config",
            str(config),
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    settings = yaml.safe_load(config.read_text())["plan"]
    kinds = [type(c).__name__ for c in cli.trainer.callbacks]
    expected = ["PlanCoordinator", "CurriculumSampler", "Distiller", "SensitivityFreezer"]
    assert kinds[:6] == [*expected, "ProgressivePruner", "QATHook"]
    assert "ModelCheckpoint" in kinds[6:]
    coordinator, curriculum, distiller, freezer, pruner, qat = cli.trainer.callbacks[:6]
    assert coordinator.plan == ThreeDPlan(**settings)
    assert curriculum.schedule.budget == settings["data_budget"] and not curriculum.prescore
    assert curriculum.rescale_loss and curriculum.schedule.budget_drops == "easiest_random"
    assert distiller.alpha == settings["distill"] and distiller.source == "snapshot"
    assert freezer.target_trainable == settings["trainable"]
    assert freezer.exclude is not None and freezer.exclude.pattern == coordinator.plan.prune_include
    assert pruner.target_sparsity == settings["sparsity"] and pruner.pattern == "heads+neurons"
    assert pruner.score == "magnitude"
    assert qat.recipe.name == "int8_weight_only"


# -- conflicts -------------------------------------------------------------------------------
def test_conflicting_settings_fail_before_the_first_step(tmp_path) -> None:
    plan = ThreeDPlan(trainable=0.5, sparsity=0.5)
    first = []

    class Steps(Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            first.append(True)

    def fails(callbacks: list[Callback], message: str, **kwargs: Any) -> None:
        with pytest.raises(ValueError, match=message):
            trainer = trainer_for([*callbacks, Steps()], tmp_path, **kwargs)
            trainer.fit(Net(), with_curriculum(trainer, loader()))
        assert not first

    coordinator, freezer, pruner = plan.callbacks()
    fails([freezer, coordinator, pruner], "must follow the step order")
    fails([coordinator, pruner, freezer], "must follow the step order")
    movement = ProgressivePruner(0.5, score="movement", include=r"^layers\.")
    fails(
        [PlanCoordinator(plan), SensitivityFreezer(0.5, warmup_steps=0), movement],
        "'layers.0.dense.weight' .* may be frozen by SensitivityFreezer and is scored by movement",
    )
    late = ProgressivePruner(0.5, include=r"^layers\.", end_step=40)  # the run has 32 steps
    fails([PlanCoordinator(plan), late, QATHook("int8_weight_only")], "pruning ends at step 40 .* "
          "has 32 optimizer steps .* QAT converts at the end")  # fmt: skip
    budget = CurriculumSampler(budget=0.5, prescore=True)
    pruned = ProgressivePruner(0.5, include=r"^layers\.", end_step=20)  # 16 steps under budget
    fails([PlanCoordinator(plan), budget, pruned], "has 16 optimizer steps .* data budget")
    early = ProgressivePruner(0.5, include=r"^layers\.", end_step=20)
    fails(
        [PlanCoordinator(plan), early, QATHook("int8_weight_only", start_step=10)],
        "fake quantization starts at step 10, before the last mask update at step 20",
    )
    fails([SensitivityFreezer(warmup_steps=0)], "needs gradient statistics measured before")


# -- all axes in one run -----------------------------------------------------------------------
class PrunedGradients(Callback):
    """After each backward: the largest gradient of a pruned, trainable weight (0 when masked
    in the backward pass, before any communication hook reads it)."""

    def __init__(self) -> None:
        self.largest: list[float] = []

    def on_after_backward(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        pruner = of_type(trainer, ProgressivePruner)
        for name, param in module.named_parameters():
            if name in pruner.masks and param.grad is not None:
                self.largest.append(float(param.grad[~pruner.masks[name]].abs().max()))


def test_all_axes_follow_one_plan_from_one_signal_pass(tmp_path) -> None:
    plan = ThreeDPlan(**ALL_AXES, **SIGNAL_PASS, probe_batches=3, qat_start=0.75)
    watcher = PrunedGradients()
    module = Net()
    trainer = trainer_for([*plan.callbacks(), watcher], tmp_path)
    trainer.fit(module, with_curriculum(trainer, loader()))
    coordinator, curriculum, freezer, pruner, qat = trainer.callbacks[:5]
    total = 4 * SAMPLES // 2 // BATCH  # 4 epochs of half the data
    assert coordinator.total_steps == trainer.global_step == total
    # one signal pass: the freezer's statistics (3 batches), shared by the pruner, and every
    # sample's score for the curriculum, before the first step
    assert freezer.statistics.steps == 3 and pruner.statistics is None
    assert sorted(freezer.statistics.names) == sorted(n for n, _ in module.named_parameters())
    assert curriculum.seen.all() and curriculum.samples_seen == total * BATCH
    assert 0 < freezer.trainable_fraction <= 0.5 and freezer.events_done == 1
    frozen = [p for n, p in module.named_parameters() if n in freezer.frozen]
    stepped = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert frozen and all(not p.requires_grad and id(p) not in stepped for p in frozen)
    assert not any(id(p) in trainer.optimizers[0].state for p in frozen)  # never had state
    # one timeline: sparsity reached at half of the run, then QAT from 75%, converted at the end
    assert pruner.window_end == total // 2
    assert pruner.achieved_sparsity == pytest.approx(0.5, abs=0.02)
    assert (
        set(pruner.layer_targets)
        == set(pruner.targets)
        == {
            "layers.0.dense.weight",
            "layers.1.dense.weight",
        }
    )
    assert qat.start_step == int(0.75 * total) and qat.stage == "converted"
    assert quantized_modules(module) == ["layers.0.dense", "layers.1.dense"]
    for name in pruner.targets:
        assert torch.all(module.get_submodule(name[: -len(".weight")]).weight.qdata[
            ~pruner.masks[name]] == 0)  # fmt: skip
    assert watcher.largest and max(watcher.largest) == 0.0


class Body(torch.nn.Module):
    """An unpruned input projection ``embed`` (the bulk of what the freezer may freeze), blocks
    ``layers.0``/``layers.1`` (what the pruner prunes) and a ``classifier`` head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(8, 256)
        self.layers = torch.nn.ModuleList([Block(256, 16), Block(16, 16)])
        self.classifier = torch.nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.embed(x))
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x)


class PhasedNet(Net):
    """:class:`Net`'s steps on :class:`Body` under ``model``, distilled with the one line."""

    def __init__(self) -> None:
        super().__init__()
        del self.layers, self.classifier
        self.model = Body()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def score_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self(batch["x"])
        per_sample = F.cross_entropy(logits, batch["labels"], reduction="none")
        per_sample = distil(per_sample, logits, batch)
        return {"per_sample_loss": per_sample, "index": batch["index"], "logits": logits}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        outputs = self.score_batch(batch)
        loss = weighted_mean(outputs["per_sample_loss"], batch)
        return {**{k: v.detach() for k, v in outputs.items()}, "loss": loss}


class Phases(Callback):
    """Per optimizer step: frozen tensors, pruned share, teacher targets, fake quantization."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.weights_at: dict[int, dict[str, torch.Tensor]] = {}
        self.distilled: set[int] = set()  # samples of batches with teacher targets

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, idx: int) -> None:
        step = trainer.global_step
        self.weights_at[step] = {k: v.clone() for k, v in module.model.state_dict().items()}
        pruner, freezer = of_type(trainer, ProgressivePruner), of_type(trainer, SensitivityFreezer)
        targets = batch.get(TEACHER_KEY)
        if targets is not None:
            rows = batch["index"] if targets.present is None else batch["index"][targets.present]
            self.distilled.update(rows.tolist())
        self.rows.append({
            "step": step,
            "frozen": len(freezer.frozen),
            "sparsity": pruner.achieved_sparsity,
            "teacher": TEACHER_KEY in batch,
            "weighted": "sample_weight" in batch,
            "fake_quant": of_type(trainer, QATHook).stage == "fake_quant",
        })  # fmt: skip


def test_the_plan_runs_in_phases_warmup_ramp_recovery_quantization(tmp_path) -> None:
    """4 epochs: 8 steps on all data, then 4 per epoch at data_budget 0.5: 20 steps. Warm-up
    to step 5, pruning ramp to step 12, recovery, fake quantization from step 16."""
    plan = ThreeDPlan(
        data_budget=0.5, trainable=0.7, sparsity=0.5, weight_bits=8, distill=0.5,
        warmup=0.25, prune_end=0.6, qat_start=0.8, data_anneal=0.0,
    )  # fmt: skip
    callbacks = plan.callbacks()
    distiller = next(c for c in callbacks if isinstance(c, Distiller))
    distiller.inputs = ("x",)  # this network's forward takes the batch's "x"
    phases = Phases()
    module = PhasedNet()
    trainer = trainer_for([*callbacks, phases], tmp_path)
    trainer.fit(module, with_curriculum(trainer, loader()))
    coordinator, _, distiller, freezer, pruner, qat = trainer.callbacks[:6]
    assert trainer.global_step == coordinator.total_steps == 8 + 3 * 4
    assert (freezer.warmup_steps, distiller.start_step) == (5, 5)
    assert (pruner.start_step, pruner.window_end, qat.start_step) == (5, 12, 16)
    rows = {row["step"]: row for row in phases.rows}
    for step, row in rows.items():
        assert (row["frozen"] > 0) == (step >= 5), step  # frozen at the end of step 4
        assert row["teacher"] == (step >= 5), step
        assert row["fake_quant"] == (step >= 16), step
        assert row["weighted"] == (step >= 8), step  # InfoBatch weights from epoch 1
    assert rows[5]["sparsity"] == 0 and 0 < rows[8]["sparsity"] < 0.5
    assert all(rows[s]["sparsity"] == pytest.approx(0.5, abs=0.02) for s in range(12, 20))
    # the parameter axis never froze what the model axis prunes, and froze the projection
    assert "model.embed.weight" in freezer.frozen and not freezer.frozen & set(pruner.targets)
    # the teacher is the model as it was after the warm-up's 5 steps; every sample distilled
    # from went through it once, over 15 steps of several epochs; it is released after epoch 1,
    # the first whole epoch of distillation
    seen = sorted(phases.distilled)
    assert distiller.snapshot_taken and len(seen) > 3 * BATCH  # more than epoch 0's last steps
    assert distiller.teacher_samples == len(distiller.cache) == len(seen) < 15 * BATCH
    assert distiller.released and distiller.teacher is None
    items = next(iter(DataLoader(Items(), batch_size=SAMPLES)))
    teacher = Body()
    teacher.load_state_dict(phases.weights_at[5])
    with torch.no_grad():
        expected = teacher(items["x"][seen])
    cached, _ = distiller.cache.targets(torch.tensor(seen))
    assert torch.allclose(cached, expected, atol=1e-6)
    assert qat.stage == "converted"


def test_the_parameter_axis_alone_measures_on_training_batches_and_freezes_before_step_one(
    tmp_path,
) -> None:
    plan = ThreeDPlan(trainable=0.3, probe_batches=2, warmup=0)
    module = Net()
    trainer = trainer_for(plan.callbacks(), tmp_path, max_epochs=1)
    trainer.fit(
        module, with_curriculum(trainer, DataLoader(Items(), batch_size=BATCH, shuffle=True))
    )
    freezer = of_type(trainer, SensitivityFreezer)
    assert freezer.statistics.steps == 2 and freezer.events_done == 1
    assert 0 < freezer.trainable_fraction <= 0.3 and "classifier.weight" not in freezer.frozen
    optimizer = trainer.optimizers[0]
    with_state = {n for n, p in module.named_parameters() if p in optimizer.state}
    assert with_state == {n for n, p in module.named_parameters() if p.requires_grad}
    assert not with_state & freezer.frozen


def test_freezing_by_depth_needs_no_signal_pass_and_freezes_from_the_bottom(tmp_path) -> None:
    """Sizes from the top: classifier 66 (always trains), layers.1 bias 32 and weight 1024,
    layers.0 bias 32 and weight 256; half of 1410 leaves 639 beside the head: the bias fits,
    the weight above it does not, so it and everything below it freeze."""
    plan = ThreeDPlan(trainable=0.5, freeze_by="depth", warmup=0)
    module = Net()
    trainer = trainer_for(plan.callbacks(), tmp_path, max_epochs=1)
    trainer.fit(
        module, with_curriculum(trainer, DataLoader(Items(), batch_size=BATCH, shuffle=True))
    )
    freezer = of_type(trainer, SensitivityFreezer)
    assert freezer.metric == "depth" and not freezer.measures_gradients
    assert freezer.statistics.steps == 0  # no probe batches, no measuring while training
    assert "plan/signal_batches" not in trainer.callback_metrics
    assert freezer.frozen == {
        "layers.1.dense.weight", "layers.0.dense.weight", "layers.0.dense.bias"
    }  # fmt: skip
    assert [n for n, p in module.named_parameters() if p.requires_grad] == [
        "layers.1.dense.bias", "classifier.weight", "classifier.bias"
    ]  # fmt: skip


def test_resume_mid_run_restores_every_axis(tmp_path) -> None:
    """8 epochs of 4 steps; pruning until step 24 (masks every 2 steps), QAT from step 25. A
    checkpoint at step 12, inside the pruning window and before the back-off at step 16; the
    resumed run ends where the whole run ends, on every axis."""
    plan = ThreeDPlan(**ALL_AXES, **{**SIGNAL_PASS, "prune_end": 0.75}, adaptive=True)
    saver = ModelCheckpoint(tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    scripted = [0.8, 0.9, 0.9, 0.7, 0.95]  # the fourth validation backs sparsity off
    whole = Net(scripted)
    epochs = {"max_epochs": 8}
    trainer = trainer_for([*plan.callbacks(), saver], tmp_path, enable_checkpointing=True, **epochs)
    trainer.fit(whole, with_curriculum(trainer, loader()), loader())
    pruner = of_type(trainer, ProgressivePruner)
    assert (pruner.start_step, pruner.window_end, pruner.frequency) == (0, 24, 2)
    assert of_type(trainer, QATHook).start_step == 25
    resumed = Net(scripted)
    again = trainer_for(plan.callbacks(), tmp_path, **epochs)
    again.fit(
        resumed,
        with_curriculum(again, loader()),
        loader(),
        ckpt_path=tmp_path / "ckpt" / "epoch=2-step=12.ckpt",
    )
    assert again.global_step == trainer.global_step == 32
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        if hasattr(a, "qdata"):
            assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale), name
        else:
            assert torch.equal(a, b), name
    for kind in (
        PlanCoordinator,
        CurriculumSampler,
        SensitivityFreezer,
        ProgressivePruner,
        QATHook,
    ):
        one, two = of_type(trainer, kind).state_dict(), of_type(again, kind).state_dict()
        assert_same(one, two, kind.__name__)
    coordinator = of_type(again, PlanCoordinator)
    assert [d["step"] for d in coordinator.backoff.decisions] == [16]
    assert of_type(again, ProgressivePruner).target_sparsity == 0.25


def assert_same(one: Any, two: Any, where: str) -> None:
    """Equal nested states: tensors exactly, floats to rounding."""
    if isinstance(one, dict):
        assert one.keys() == two.keys(), where
        for key in one:
            assert_same(one[key], two[key], f"{where}.{key}")
    elif isinstance(one, (list, tuple)):
        assert len(one) == len(two), where
        for i, (a, b) in enumerate(zip(one, two, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    elif torch.is_tensor(one):
        assert torch.equal(one, two), where
    elif isinstance(one, float):
        assert one == pytest.approx(two, rel=1e-6), where
    else:
        assert one == two, where


def test_adaptive_mode_backs_off_sparsity_and_logs_each_decision(tmp_path) -> None:
    plan = ThreeDPlan(
        sparsity=0.8, adaptive=True, margin=0.05, backoff=0.5, prune_end=0.25, warmup=0
    )
    logger = CSVLogger(tmp_path, name="csv")
    trainer = trainer_for(
        plan.callbacks(), tmp_path, logger=logger, log_every_n_steps=1, max_epochs=6
    )
    # 0.88: within the margin of 0.9; 0.8: back off, best starts again; 0.85: the new best;
    # 0.75: back off; the last validation (no step left) is not acted on
    module = Net([0.9, 0.88, 0.8, 0.85, 0.75, 0.6])
    trainer.fit(module, with_curriculum(trainer, loader()), loader())
    coordinator, pruner = trainer.callbacks[:2]
    assert [d["new_sparsity"] for d in coordinator.backoff.decisions] == [0.4, 0.2]
    assert pruner.target_sparsity == 0.2
    assert pruner.achieved_sparsity == pytest.approx(0.2, abs=0.02)  # masks grew back
    for name in pruner.targets:
        live = pruner.masks[name].float().mean().item()
        assert live == pytest.approx(0.8, abs=0.05) and torch.all(
            module.get_submodule(name[: -len(".weight")]).weight[~pruner.masks[name]] == 0
        )
    with open(next(tmp_path.glob("csv/version_*/metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    logged = [float(r["plan/sparsity_target"]) for r in rows if r.get("plan/sparsity_target")]
    assert logged == [0.8, 0.8, 0.4, 0.4, 0.2]
    assert [float(r["plan/backoffs"]) for r in rows if r.get("plan/backoffs")] == [0, 0, 1, 1, 2]


# -- the real model ----------------------------------------------------------------------------
def test_minilm_3d_run_trains_converts_and_exports(tmp_path, rotten_tomatoes) -> None:
    from lightning_3d.data import IndexedDataset, RottenTomatoes
    from lightning_3d.tasks import SequenceClassificationTask

    task = SequenceClassificationTask(learning_rate=5e-4)
    data = RottenTomatoes(tokenizer=task.tokenizer, batch_size=8, max_length=32)
    data.setup("fit")
    train = data.splits["train"]
    data.splits["train"] = IndexedDataset(train.input_ids[:48], train.labels[:48])
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    plan = ThreeDPlan(
        data_budget=0.5, trainable=0.1, sparsity=0.5, weight_bits=4, probe_batches=2,
        **SIGNAL_PASS,
    )  # fmt: skip
    trainer = trainer_for(plan.callbacks(), tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(task, datamodule=data)
    coordinator, _, freezer, pruner, qat = trainer.callbacks[:5]
    assert trainer.global_step == coordinator.total_steps == 6  # 2 epochs of 24 samples
    plain = {n: p for n, p in task.named_parameters() if not hasattr(p, "qdata")}
    changed = {n for n, p in plain.items() if not torch.equal(p, before[n])}
    params = dict(task.named_parameters())
    assert freezer.trainable_fraction <= 0.1 and "model.classifier.weight" in changed
    assert freezer.frozen and not any(params[n].requires_grad for n in freezer.frozen)
    assert qat.stage == "converted" and pruner.achieved_sparsity == pytest.approx(0.5, abs=0.01)
    test_batch = next(iter(data.val_dataloader()))

    def agreement(model: torch.nn.Module) -> float:
        ids = test_batch["input_ids"], test_batch["attention_mask"]
        logits = model(input_ids=ids[0], attention_mask=ids[1]).logits
        return (logits.argmax(-1) == test_batch["labels"]).float().mean().item()

    task.eval()
    report = qat.export(task.model, tmp_path / "export", evaluate=agreement)
    assert report["float_bytes"] / report["file_bytes"] > 4
    reloaded = load_quantized(tmp_path / "export")
    for name, mask in pruner.masks.items():  # pruned weights stay zero in the int4 export
        weight = reloaded.get_submodule(name.removeprefix("model.").removesuffix(".weight")).weight
        assert torch.all(weight.qdata[~mask] == 0), name
    with torch.no_grad():
        ids = test_batch["input_ids"], test_batch["attention_mask"]
        expected = task.model(input_ids=ids[0], attention_mask=ids[1]).logits
        got = reloaded(input_ids=ids[0], attention_mask=ids[1]).logits
    assert torch.equal(got, expected)


# -- the whole plan on several ranks -------------------------------------------------------------
@pytest.mark.parametrize("ranks", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_the_whole_plan_agrees_on_every_ddp_rank(launch_two_ranks, tmp_path, ranks) -> None:
    import json

    results = launch_two_ranks("plan", tmp_path, 900, ranks)
    for result in results:
        assert result.returncode == 0, result.stdout[-3000:]
    runs = [json.loads((tmp_path / f"plan.rank{r}.json").read_text()) for r in range(ranks)]
    first = runs[0]
    warm, start, prune_start, prune_end, qat_start = first["phases"]
    assert first["steps"] == first["total_steps"] and warm == start == prune_start >= 1
    assert prune_end > prune_start and qat_start >= prune_end
    # decisions are the same everywhere: phases, data scores, frozen set, masks, parameters
    for other in runs[1:]:
        for key in ("steps", "phases", "scores", "frozen", "pruned_targets", "masks"):
            assert other[key] == first[key], key
        assert other["mask_spread"] == 0.0 and other["rank_spread"] == 0.0  # against rank 0's
    assert first["frozen"] and not set(first["frozen"]) & set(first["pruned_targets"])
    assert first["achieved_sparsity"] == pytest.approx(0.3, abs=0.02)
    # each rank runs the teacher on its own share, from the snapshot step; the ranks share what
    # they cached at every epoch's end, so each sample goes through a teacher about once, and the
    # teacher is released after the first whole epoch of distillation
    for run in runs:
        assert run["teacher_steps"][0] == start and run["qat_stage"] == "converted"
        assert run["cached"] == first["cached"] and run["released"]
        assert set(run["distilled"]) <= set(run["cached"])
    # (a rank's shard of an epoch repeats up to ranks - 1 samples so that shards are equal)
    forwards = sum(run["teacher_samples"] for run in runs)
    assert len(first["cached"]) <= forwards <= len(first["cached"]) + (ranks - 1) * 3
    assert all(0 < run["teacher_samples"] < len(first["cached"]) for run in runs)
