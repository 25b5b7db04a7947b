"""SensitivityFreezer in real Lightning runs: what it freezes, what freezing saves, resume,
layer-wise learning rates, errors, several ranks, and the real MiniLM (full weights and LoRA).

A small layered network on fixed synthetic data keeps most runs to a second each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_3d.callbacks import SensitivityFreezer, find_gradient_statistics
from lightning_3d.sensitivity import optimizer_state_bytes

STEPS_PER_EPOCH, BATCH = 8, 8


def points() -> DataLoader:
    x = torch.randn(STEPS_PER_EPOCH * BATCH, 8, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=BATCH)


class Layered(pl.LightningModule):
    """``embed``, four ``encoder.layers.i`` and a ``classifier`` head (1266 parameters), trained
    with AdamW in two groups (decay / no decay) under a linearly decaying learning rate."""

    def __init__(self, optimizer: str = "adamw") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(8, 16)
        self.encoder = torch.nn.Module()
        self.encoder.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))
        self.classifier = torch.nn.Linear(16, 2)
        self.optimizer = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.embed(x))
        for layer in self.encoder.layers:
            hidden = torch.tanh(layer(hidden))
        return self.classifier(hidden)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> dict[str, Any]:
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n.endswith("weight")], "weight_decay": 0.01},
            {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
        ]
        if self.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            optimizer = bnb.optim.AdamW8bit(groups, lr=1e-2, min_8bit_size=64)
        else:
            optimizer = torch.optim.AdamW(groups, lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 100)
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}


class Recorder(Callback):
    """The gradients of the first ``steps`` optimizer steps, the parameters right after step
    ``snapshot_at``, and the trainable fraction after every step. Put it after the freezer."""

    def __init__(self, steps: int = 0, snapshot_at: int = -1) -> None:
        self.steps, self.snapshot_at = steps, snapshot_at
        self.gradients: list[dict[str, np.ndarray]] = []
        self.snapshot: dict[str, torch.Tensor] = {}
        self.fractions: list[float] = []

    def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
        if trainer.global_step < self.steps:
            grads = {n: p.grad.double().numpy().copy() for n, p in module.named_parameters()}
            self.gradients.append(grads)

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        if trainer.global_step == self.snapshot_at:
            self.snapshot = {n: p.detach().clone() for n, p in module.named_parameters()}
        freezer = next(c for c in trainer.callbacks if isinstance(c, SensitivityFreezer))
        self.fractions.append(freezer.trainable_fraction)


def trainer_for(
    callbacks: list[Callback], steps: int = -1, epochs: int | None = None, **kwargs: Any
) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_frozen_tensors_stop_changing_and_hold_no_optimizer_state(optimizer: str) -> None:
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    module = Layered(optimizer)
    freezer = SensitivityFreezer(target_trainable=0.3, warmup_steps=4)
    recorder = Recorder(snapshot_at=4)
    trainer = trainer_for([freezer, recorder], steps=16)
    trainer.fit(module, points())

    params = dict(module.named_parameters())
    total = sum(p.numel() for p in params.values())
    assert freezer.frozen and "classifier.weight" not in freezer.frozen  # the head trains
    kept = sum(params[n].numel() for n in params if n not in freezer.frozen)
    assert 0.3 * total - 272 < kept <= 0.3 * total  # the budget, filled to within one layer
    assert freezer.trainable_fraction == pytest.approx(kept / total)
    opt = trainer.optimizers[0]
    in_groups = {id(p) for group in opt.param_groups for p in group["params"]}
    for name, param in params.items():
        moved = not torch.equal(param, recorder.snapshot[name])
        if name in freezer.frozen:
            assert not moved and not param.requires_grad and param.grad is None
            assert param not in opt.state and id(param) not in in_groups
        else:
            assert moved and param in opt.state and id(param) in in_groups
    assert recorder.fractions[:3] == [1.0, 1.0, 1.0] and recorder.fractions[3] < 0.3
    if optimizer == "adamw8bit":  # 8-bit moments for the big tensors
        assert any(s["state1"].dtype == torch.uint8 for s in opt.state.values())


def test_the_frozen_set_follows_the_fisher_ranking_of_the_measured_gradients() -> None:
    module = Layered()
    freezer = SensitivityFreezer(target_trainable=0.4, warmup_steps=5)
    recorder = Recorder(steps=5)
    trainer_for([freezer, recorder], steps=6).fit(module, points())

    sizes = {n: p.numel() for n, p in module.named_parameters()}
    fisher = {n: np.mean([np.square(g[n]).mean() for g in recorder.gradients]) for n in sizes}
    for name, value in freezer.statistics.tensor_metric("fisher").items():
        assert value == pytest.approx(fisher[name], rel=1e-9)
    # the reference choice: the head, then tensors by Fisher per parameter while they fit
    budget = int(0.4 * sum(sizes.values())) - sizes["classifier.weight"] - sizes["classifier.bias"]
    kept, used = set(), 0
    candidates = [n for n in sizes if not n.startswith("classifier")]
    for name in sorted(candidates, key=lambda n: -fisher[n]):
        if used + sizes[name] <= budget:
            kept.add(name)
            used += sizes[name]
    assert freezer.frozen == set(candidates) - kept
    assert find_gradient_statistics(trainer_for([freezer], 1)) is freezer.statistics


@pytest.mark.parametrize("metric", ["random", "depth", "composite", "snr"])
def test_other_metrics_and_baselines_fill_the_same_budget(metric: str) -> None:
    module = Layered()
    freezer = SensitivityFreezer(target_trainable=0.5, metric=metric, warmup_steps=3, seed=1)
    trainer_for([freezer], steps=5).fit(module, points())
    sizes = {n: p.numel() for n, p in module.named_parameters()}
    kept = sum(size for n, size in sizes.items() if n not in freezer.frozen)
    assert 0.5 * 1266 - 272 < kept <= 0.5 * 1266
    if metric == "depth":  # the lowest tensors freeze first
        # from the top down, until a tensor does not fit: everything below it freezes
        assert freezer.frozen == {
            "embed.weight", "embed.bias", "encoder.layers.0.weight", "encoder.layers.0.bias",
            "encoder.layers.1.weight",
        }  # fmt: skip
    if metric == "composite":
        drift = freezer._drift(module)
        assert all(value > 0 for value in drift.values())  # every candidate moved in warm-up


def test_progressive_schedule_freezes_step_by_step_and_unfreezing_restores_training() -> None:
    module = Layered()
    freezer = SensitivityFreezer(
        target_trainable=0.25, schedule="progressive", stages=3, interval=2, warmup_steps=2,
        allow_unfreeze=True, group_by="module",
    )  # fmt: skip
    recorder = Recorder()
    trainer = trainer_for([freezer, recorder], steps=9)
    trainer.fit(module, points())
    after_events = [recorder.fractions[i] for i in (1, 3, 5)]  # steps 2, 4 and 6
    for got, target in zip(after_events, (0.75, 0.5, 0.25), strict=True):
        assert target - 272 / 1266 < got <= target
    assert freezer.events_done == 3 and recorder.fractions[-1] == after_events[-1]
    # unfreezing puts a tensor back into its optimizer group, with fresh state
    name = sorted(freezer.frozen)[0]
    freezer._apply(trainer, module, freeze=set(), unfreeze={name})
    param = dict(module.named_parameters())[name]
    assert param.requires_grad and name not in freezer.frozen
    assert any(p is param for group in trainer.optimizers[0].param_groups for p in group["params"])


def test_layerwise_lr_decay_scales_the_groups_and_follows_the_schedule() -> None:
    module = Layered()
    freezer = SensitivityFreezer(target_trainable=1.0, warmup_steps=2, lr_decay=0.5)
    trainer = trainer_for([freezer], steps=4)
    trainer.fit(module, points())
    assert not freezer.frozen  # a target of 1.0 keeps everything: every scale is checked
    lr_of = {p: g["lr"] for g in trainer.optimizers[0].param_groups for p in g["params"]}
    base = 1e-2 * (1 - 4 / 100)  # the LambdaLR factor after 4 steps
    params = dict(module.named_parameters())
    expected = {"embed": 0.5**5, "classifier": 1.0}
    expected |= {f"encoder.layers.{i}": 0.5 ** (4 - i) for i in range(4)}
    for name, param in params.items():
        assert lr_of[param] == pytest.approx(base * expected[name.rsplit(".", 1)[0]]), name


def test_without_warmup_a_baseline_freezes_before_the_first_step() -> None:
    module = Layered()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    freezer = SensitivityFreezer(target_trainable=0.5, metric="depth", warmup_steps=0)
    trainer_for([freezer], steps=2).fit(module, points())
    assert freezer.frozen and freezer.events_done == 1
    for name, param in module.named_parameters():
        assert torch.equal(param, before[name]) == (name in freezer.frozen), name


@pytest.mark.parametrize("warmup", [10, 5])  # stopped at step 8: in warm-up, between events
def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, warmup: int) -> None:
    def make() -> SensitivityFreezer:
        return SensitivityFreezer(
            target_trainable=0.3, schedule="progressive", stages=2, interval=6,
            warmup_steps=warmup, lr_decay=0.8,
        )  # fmt: skip

    whole, freezer = Layered(), make()
    trainer_for([freezer], epochs=3).fit(whole, points())

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_on_train_epoch_end=True)
    first = trainer_for([make(), checkpoint], epochs=1, enable_checkpointing=True)
    first.fit(Layered(), points())  # one epoch of 8 steps, checkpointed at its end
    resumed_module, resumed = Layered(), make()
    trainer = trainer_for([resumed], epochs=3)
    trainer.fit(resumed_module, points(), ckpt_path=checkpoint.best_model_path)

    assert trainer.global_step == 3 * STEPS_PER_EPOCH and resumed.events_done == 2
    assert resumed.frozen == freezer.frozen and len(freezer.frozen) > 0
    for (name, a), b in zip(whole.named_parameters(), resumed_module.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.statistics.names == freezer.statistics.names
    for name in freezer.statistics.names:
        assert torch.equal(resumed.statistics.fisher(name), freezer.statistics.fisher(name))


def test_bad_arguments_raise_clear_errors() -> None:
    cases = [
        ({"target_trainable": 0.0}, r"target_trainable must be in \(0, 1\], got 0.0"),
        ({"metric": "hessian"}, "metric must be one of"),
        ({"schedule": "cubic"}, "schedule must be one of"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0, got -1"),
        ({"stages": 0}, "stages, interval and measure_every must be positive"),
        ({"allow_unfreeze": True}, "allow_unfreeze needs schedule='progressive'"),
        ({"granularity": "channel"}, "granularity must be one of"),
        ({"alpha": -1.0}, "alpha and beta must be >= 0"),
        ({"lr_decay": 0.0}, r"lr_decay must be in \(0, 1\]"),
        ({"include": "layer[("}, r"include='layer\[\(' is not a valid regex"),
        ({"layer_pattern": r"layer\.\d+"}, "needs a capture group"),
        ({"group_by": "(("}, "group_by='\\(\\(' is not a valid regex"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            SensitivityFreezer(**kwargs)
    SensitivityFreezer(metric="random", warmup_steps=0)  # baselines need no measurement


def test_set_up_errors_name_the_problem_before_training() -> None:
    message = r"must stay trainable.*are 2\.7% .*target_trainable=0\.02"
    with pytest.raises(ValueError, match=message):
        trainer_for([SensitivityFreezer(target_trainable=0.02)], steps=1).fit(Layered(), points())
    with pytest.raises(ValueError, match="no parameter may be frozen"):
        freezer = SensitivityFreezer(include="decoder")
        trainer_for([freezer], steps=1).fit(Layered(), points())
    message = "warmup_steps=0 with metric='fisher' needs gradient statistics measured before"
    with pytest.raises(ValueError, match=message):
        trainer_for([SensitivityFreezer(warmup_steps=0)], steps=1).fit(Layered(), points())


def test_two_ranks_ddp_and_fsdp2_agree_on_the_frozen_set_and_fsdp2_resumes(
    tmp_path: Path, launch_two_ranks: Any
) -> None:
    for rank, result in enumerate(launch_two_ranks("freezer,freezer_resume", tmp_path, 900)):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stdout[-6000:]}"
    ranks = [json.loads((tmp_path / f"freezer.rank{r}.json").read_text()) for r in range(2)]
    ddp = ranks[0]["ddp"]
    assert ddp["trainable_fraction"] <= 0.1 and ddp["frozen"]
    for strategy in ("ddp", "fsdp", "fsdp_compressed"):
        zero, one = ranks[0][strategy], ranks[1][strategy]
        assert zero["frozen"] == one["frozen"] and zero["steps"] == one["steps"] == 6
        assert zero["frozen_moved"] == 0.0 and zero["trainable_moved"] > 0
        trainable = sorted(set(zero["requires_grad"]))
        assert zero["optimizer_params"] == zero["state_params"] == trainable
        assert not set(zero["frozen"]) & set(trainable)
    for rank in ranks:
        assert rank["ddp"]["rank_spread"] == 0.0  # the DDP replicas hold the same model
        # each FSDP2 rank's own shards are its part of the DDP model (the same training; only the
        # order of the gradient sums differs)
        assert rank["fsdp"]["shard_vs_ddp"] <= 1e-4
    fsdp = ranks[0]["fsdp"]
    assert fsdp["frozen"] == ddp["frozen"]  # the same gradients, sharded or not
    for name, value in ddp["fisher"].items():
        assert fsdp["fisher"][name] == pytest.approx(value, rel=1e-4)
    resume = json.loads((tmp_path / "freezer_resume.rank0.json").read_text())
    assert resume["frozen_resumed"] == resume["frozen_whole"] and resume["frozen_whole"]
    assert resume["steps"] == 6 and resume["difference"] == 0.0  # FSDP2 resume, bit for bit


@pytest.mark.slow
def test_fsdp2_keeps_the_composite_reference_sharded_and_resumes_bit_for_bit(
    tmp_path: Path, launch_two_ranks: Any
) -> None:
    """The composite metric's theta_0 copies go into the sharded checkpoint shard by shard and
    the second freezing event after the resume decides as the uninterrupted run's did."""
    for rank, result in enumerate(launch_two_ranks("freezer_composite_resume", tmp_path, 900)):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stdout[-6000:]}"
    resume = json.loads((tmp_path / "freezer_composite_resume.rank0.json").read_text())
    assert resume["references"] > 0 and resume["references_sharded"]
    assert resume["frozen_resumed"] == resume["frozen_whole"] and resume["frozen_whole"]
    assert resume["steps"] == 6 and resume["difference"] == 0.0


def test_minilm_full_weights_and_lora(rotten_tomatoes: Any) -> None:
    """The real MiniLM: 10% of the weights train after three measured steps (the head among
    them); under LoRA the freezer ranks the adapters only (20% of them train)."""
    from lightning_3d.data import PaddingCollator
    from lightning_3d.tasks import LoRASettings, SequenceClassificationTask

    for lora, target in ((None, 0.1), (LoRASettings(r=4), 0.2)):
        pl.seed_everything(0, verbose=False)
        task = SequenceClassificationTask(lora=lora)
        loader = DataLoader(
            torch.utils.data.Subset(rotten_tomatoes.splits["train"], range(40)),
            batch_size=8,
            collate_fn=PaddingCollator(int(task.tokenizer.pad_token_id)),
        )
        trainable = {n: p.numel() for n, p in task.named_parameters() if p.requires_grad}
        freezer = SensitivityFreezer(target_trainable=target, warmup_steps=3)
        trainer = trainer_for([freezer], steps=5)
        trainer.fit(task, loader)
        adapter = 4 * 384 / sum(trainable.values())  # one LoRA matrix
        floor = target - adapter if lora is not None else 0.05
        assert floor < freezer.trainable_fraction <= target
        assert set(freezer.frozen) <= set(trainable)  # LoRA's frozen base stays untouched
        assert not any("classifier" in n for n in freezer.frozen)
        if lora is not None:
            assert all("lora_" in n for n in freezer.frozen)
        state = sum(optimizer_state_bytes(o) for o in trainer.optimizers)
        kept = sum(size for n, size in trainable.items() if n not in freezer.frozen)
        assert state == pytest.approx(8 * kept, rel=0.01)  # two fp32 moments per trained value


def test_the_early_state_load_only_happens_when_fitting() -> None:
    """Testing or predicting from a checkpoint has no optimizer to shape: the hook the FSDP2
    strategy calls before it loads does nothing then (it would read the file otherwise)."""
    freezer = SensitivityFreezer()
    trainer = trainer_for([freezer], steps=1)
    freezer.on_before_strategy_load(trainer, "no-such-checkpoint.ckpt")
    assert freezer.frozen == set() and freezer.events_done == 0
