"""ProgressivePruner in real Lightning runs: sparsity against the schedule, pruned weights held at
zero, movement scores against a reference, resume, sensitivity-driven sparsity, logs, errors,
two ranks, and the real MiniLM pruned and exported.

A small layered network on fixed synthetic data keeps most runs to a second each.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_3d.callbacks import ProgressivePruner, SensitivityFreezer
from lightning_3d.pruning import load_pruned, obeys_n_m

STEPS_PER_EPOCH, BATCH = 8, 8
TARGETS = ["embed.weight", *(f"encoder.layers.{i}.weight" for i in range(4))]


def points(batch_size: int = BATCH) -> DataLoader:
    x = torch.randn(STEPS_PER_EPOCH * BATCH, 8, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=batch_size)


class Stack(pl.LightningModule):
    """``embed`` (8 -> 16), four ``encoder.layers.i`` (16 -> 16) and a ``classifier`` head,
    trained with AdamW (weight decay 0.1, so decay alone would move a zero weight: it must not)."""

    def __init__(self, width_in: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(width_in, 16)
        self.encoder = torch.nn.Module()
        self.encoder.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))
        self.classifier = torch.nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.embed(x))
        for layer in self.encoder.layers:
            hidden = torch.tanh(layer(hidden))
        return self.classifier(hidden)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


class Watcher(Callback):
    """After every step: the zero positions of the targets; before every optimizer step (put it
    before the pruner): the reference movement ``-sum theta * g`` of the steps before ``end``."""

    def __init__(self, end: int = 0) -> None:
        self.end = end
        self.zeros: list[dict[str, torch.Tensor]] = []
        self.movement: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
        if trainer.global_step >= self.end:
            return
        for name, param in module.named_parameters():
            if name in TARGETS:
                step = -(param.detach().double() * param.grad.double())
                self.movement[name] = self.movement.get(name, 0) + step

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        params = dict(module.named_parameters())
        self.zeros.append({n: params[n].detach() == 0 for n in TARGETS})


def trainer_for(callbacks: list[Callback], steps: int, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        logger=kwargs.pop("logger", False),
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("pattern", "scope", "score"),
    [
        ("unstructured", "layer", "magnitude"),
        ("unstructured", "global", "movement"),
        ("2:4", "layer", "magnitude"),
        ("rows", "layer", "movement"),
    ],
)
def test_sparsity_follows_the_schedule_and_pruned_weights_stay_zero(
    pattern: str, scope: str, score: str
) -> None:
    target = None if pattern == "2:4" else 0.75
    pruner = ProgressivePruner(
        target, pattern=pattern, scope=scope, score=score, start_step=2, end_step=10, frequency=2
    )
    watcher = Watcher()
    module = Stack()
    trainer = trainer_for([pruner, watcher], steps=16)
    trainer.fit(module, points())

    sizes = {n: p.numel() for n, p in module.named_parameters() if n in TARGETS}
    assert pruner.targets == TARGETS  # the classifier head is left alone
    for step, zeros in enumerate(watcher.zeros, start=1):
        scheduled = pruner.sparsity_at(step)
        if pattern == "rows":  # whole rows: round(s * 16) of each weight's 16 rows
            expected = {n: round(scheduled * 16) * z.shape[1] for n, z in zeros.items()}
            assert {n: int(z.sum()) for n, z in zeros.items()} == expected
        else:
            achieved = sum(int(z.sum()) for z in zeros.values()) / sum(sizes.values())
            assert achieved == pytest.approx(scheduled, abs=0.005), step
        if step > 1:  # what was pruned stays exactly zero through AdamW's moments and decay
            for name, before in watcher.zeros[step - 2].items():
                assert zeros[name][before].all(), (step, name)
    assert pruner.sparsity == pytest.approx(0.75 if target else 0.5)
    params = dict(module.named_parameters())
    optimizer = trainer.optimizers[0]
    for name in TARGETS:
        pruned = ~pruner.masks[name]
        assert not params[name][pruned].any()
        assert not optimizer.state[params[name]]["exp_avg"][pruned].any()
        if pattern == "2:4":
            assert obeys_n_m(params[name], 2, 4)


def test_movement_scores_equal_the_accumulated_reference() -> None:
    pruner = ProgressivePruner(0.5, score="movement", start_step=3, end_step=9, frequency=3)
    watcher = Watcher(end=9)
    trainer_for([watcher, pruner], steps=12).fit(Stack(), points())
    for name in TARGETS:
        assert torch.allclose(pruner.movement[name].double(), watcher.movement[name], rtol=1e-5)


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("stop", [2, 6])  # before the first update, and between updates
def test_resume_equals_the_uninterrupted_run(tmp_path: Path, stop: int) -> None:
    """Epochs of two steps, so the cut falls on an epoch boundary (the plain loader cannot
    resume mid-epoch)."""

    def pruner() -> ProgressivePruner:
        return ProgressivePruner(0.6, score="movement", start_step=4, end_step=10, frequency=2)

    whole_pruner, resumed_pruner = pruner(), pruner()
    whole = Stack()
    trainer_for([whole_pruner], steps=16).fit(whole, points(32))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="cut", every_n_train_steps=stop)
    first = trainer_for([pruner(), StopAt(stop), checkpoint], steps=16, enable_checkpointing=True)
    first.fit(Stack(), points(32))
    resumed = Stack()
    trainer_for([resumed_pruner], steps=16).fit(
        resumed, points(32), ckpt_path=tmp_path / "cut.ckpt"
    )
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
    for name in TARGETS:
        assert torch.equal(whole_pruner.masks[name], resumed_pruner.masks[name])
        assert torch.equal(whole_pruner.movement[name], resumed_pruner.movement[name])
    assert whole_pruner.sparsity == resumed_pruner.sparsity == 0.6


def test_layer_sparsity_from_the_freezers_statistics() -> None:
    """With a SensitivityFreezer in the run, the pruner reads its statistics: the tensors with
    the lowest Fisher x mean(theta^2) get the highest sparsity, averaging the target."""
    freezer = SensitivityFreezer(target_trainable=1.0, warmup_steps=4)
    pruner = ProgressivePruner(
        0.6, layer_sparsity="sensitivity", start_step=4, end_step=8, frequency=2
    )
    module = Stack()
    trainer_for([freezer, pruner], steps=10).fit(module, points())
    assert pruner.statistics is None  # it measured nothing itself
    sizes = {n: p.numel() for n, p in module.named_parameters() if n in TARGETS}
    allocated = pruner.layer_targets
    mean = sum(sizes[n] * allocated[n] for n in TARGETS) / sum(sizes.values())
    assert mean == pytest.approx(0.6, abs=1e-6)
    assert len(set(allocated.values())) == len(TARGETS)  # not uniform
    params = dict(module.named_parameters())
    for name in TARGETS:
        zeros = int((params[name] == 0).sum())
        assert zeros == round(allocated[name] * sizes[name])
    alone = ProgressivePruner(0.6, layer_sparsity="sensitivity", start_step=4, end_step=8)
    trainer_for([alone], steps=6).fit(Stack(), points())
    assert alone.statistics is not None
    # measured until the first mask update (step 8 here): all 6 steps of 128 values
    assert alone.statistics.count(TARGETS[0]) == 6 * 128


def test_logs_global_and_per_layer_sparsity(tmp_path: Path) -> None:
    pruner = ProgressivePruner(0.5, start_step=2, end_step=6, frequency=2)
    logger = CSVLogger(tmp_path, name="csv")
    trainer_for([pruner], steps=8, logger=logger, log_every_n_steps=1).fit(Stack(), points())
    rows = list(csv.DictReader((Path(logger.log_dir) / "metrics.csv").open()))
    final = [r for r in rows if r.get("pruner/sparsity_layer_3")]
    assert final and float(final[-1]["pruner/sparsity_layer_3"]) == pytest.approx(0.5)
    assert float(final[-1]["pruner/sparsity_other"]) == pytest.approx(0.5)  # embed.weight
    assert float([r for r in rows if r.get("pruner/sparsity")][-1]["pruner/sparsity"]) == 0.5


def test_sparsity_reaches_callback_metrics_without_a_logger() -> None:
    """EarlyStopping, ModelCheckpoint and the progress bar read ``trainer.callback_metrics``."""
    pruner = ProgressivePruner(0.5, start_step=2, end_step=6, frequency=2)
    trainer = trainer_for([pruner], steps=8)
    trainer.fit(Stack(), points())
    assert float(trainer.callback_metrics["pruner/sparsity"]) == pytest.approx(0.5)
    assert float(trainer.callback_metrics["pruner/sparsity_layer_3"]) == pytest.approx(0.5)


def test_bad_arguments_raise_clear_errors() -> None:
    cases = [
        ({"target_sparsity": 1.0}, r"target_sparsity must be in \[0, 1\)"),
        ({"pattern": "2:4", "target_sparsity": 0.7}, "prunes exactly 0.5 of the weights"),
        ({"pattern": "blocks"}, "pattern must be"),
        ({"score": "taylor"}, "score must be one of"),
        ({"schedule": "step"}, "schedule must be one of"),
        ({"scope": "model"}, "scope must be one of"),
        ({"scope": "global", "pattern": "rows"}, "scope='global' needs pattern='unstructured'"),
        ({"layer_sparsity": "fisher"}, "layer_sparsity must be one of"),
        ({"layer_sparsity": "sensitivity", "pattern": "2:4", "target_sparsity": None}, "needs"),
        ({"start_step": 5, "end_step": 5}, "end_step > start_step"),
        ({"frequency": 0}, "frequency >= 1"),
        ({"initial_sparsity": 0.6}, "initial_sparsity must be in"),
        ({"include": "(("}, "include='\\(\\(' is not a valid regex"),
        ({"layer_pattern": r"layer\.\d+"}, "needs a capture group for the layer number"),
        ({"sensitivity_power": -1.0}, "sensitivity_power must be >= 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ProgressivePruner(**kwargs)


def test_set_up_errors_name_the_problem_before_training() -> None:
    def fit(pruner: ProgressivePruner, module: Stack | None = None) -> None:
        trainer_for([pruner], steps=1).fit(module or Stack(), points())

    with pytest.raises(ValueError, match="found no heads"):
        fit(ProgressivePruner(0.3, pattern="heads"))
    with pytest.raises(ValueError, match="no linear weight passes include/exclude"):
        fit(ProgressivePruner(include="decoder"))
    with pytest.raises(ValueError, match=r"divisible by 4; embed.weight has shape \(16, 6\)"):
        odd = Stack(width_in=6)
        trainer_for([ProgressivePruner(pattern="2:4", target_sparsity=None)], steps=1).fit(
            odd, DataLoader(TensorDataset(torch.randn(8, 6), torch.zeros(8).long()))
        )
    frozen = Stack()
    frozen.embed.requires_grad_(False)
    with pytest.raises(ValueError, match=r"score='movement' needs gradients, but embed\.weight"):
        fit(ProgressivePruner(score="movement"), frozen)


def test_two_ranks_ddp_and_fsdp2_share_one_mask_and_fsdp2_resumes(
    tmp_path: Path, launch_two_ranks: Any
) -> None:
    scenarios = "pruner,pruner_resume,pruner_checkpoint"
    for rank, result in enumerate(launch_two_ranks(scenarios, tmp_path, 900)):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stdout[-6000:]}"
    ranks = [json.loads((tmp_path / f"pruner.rank{r}.json").read_text()) for r in range(2)]
    for strategy in ("ddp", "fsdp"):
        zero, one = ranks[0][strategy], ranks[1][strategy]
        assert zero["masks"] == one["masks"]
        assert zero["sparsity"] == pytest.approx(0.5, abs=0.005)
        for rank in (zero, one):  # each rank's own shard is zero where its own mask prunes
            assert rank["own_pruned_nonzero"] == 0
    for rank in ranks:
        assert rank["ddp"]["rank_spread"] == 0.0  # the DDP replicas did not drift apart
        # each FSDP2 rank's own mask shard is its part of the DDP run's masks (movement scores
        # from gradients summed in another order may flip an entry at the threshold, no more)
        assert rank["fsdp"]["mask_disagreement"] <= 1e-3
    resume = json.loads((tmp_path / "pruner_resume.rank0.json").read_text())
    assert resume["steps"] == 6 and resume["difference"] == 0.0  # FSDP2 resume, bit for bit
    assert resume["masks_equal"]
    assert_masks_checkpointed_sharded(tmp_path)


def assert_masks_checkpointed_sharded(folder: Path) -> None:
    """The pruner's masks went into the sharded checkpoint as each rank's own shard
    (``callback_tensors/``), with references, not tensors, in the metadata file."""
    layout = json.loads((folder / "pruner_checkpoint.rank0.json").read_text())
    assert layout["masks_are_references"] and layout["meta_tensors"] == 0
    assert layout["references"] and set(layout["references"]) <= set(layout["saved"])
    assert all(key.startswith("ProgressivePruner/masks/") for key in layout["references"])


@pytest.mark.slow
def test_fsdp2_on_3_ranks_keeps_masks_sharded_and_resumes_bit_for_bit(
    tmp_path: Path, launch_two_ranks: Any
) -> None:
    """The 2-rank test above, on 3 ranks."""
    launched = launch_two_ranks("pruner_resume,pruner_checkpoint", tmp_path, 900, ranks=3)
    for rank, result in enumerate(launched):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stdout[-6000:]}"
    resume = json.loads((tmp_path / "pruner_resume.rank0.json").read_text())
    assert resume["difference"] == 0.0 and resume["masks_equal"]
    assert_masks_checkpointed_sharded(tmp_path)


def test_minilm_heads_and_neurons_pruned_then_exported(
    tmp_path: Path, rotten_tomatoes: Any
) -> None:
    """The real MiniLM: a quarter of the heads and neurons of every block pruned in three steps;
    the export is smaller, loads, and computes what the masked model computed."""
    from lightning_3d.data import PaddingCollator
    from lightning_3d.tasks import SequenceClassificationTask

    pl.seed_everything(0, verbose=False)
    task = SequenceClassificationTask()
    collate = PaddingCollator(int(task.tokenizer.pad_token_id))
    subset = torch.utils.data.Subset(rotten_tomatoes.splits["train"], range(32))
    pruner = ProgressivePruner(0.25, pattern="heads+neurons", start_step=1, end_step=3, frequency=1)
    trainer_for([pruner], steps=4).fit(task, DataLoader(subset, batch_size=8, collate_fn=collate))
    assert len(pruner.groups) == 12  # 6 blocks x (heads, neurons)
    batch = collate([rotten_tomatoes.splits["test"][i] for i in range(6)])
    task.eval()
    with torch.no_grad():
        masked = task(batch["input_ids"], batch["attention_mask"])
    before = sum(p.numel() for p in task.model.parameters())
    model = pruner.export(task, tmp_path / "pruned")
    removed = before - sum(p.numel() for p in model.parameters())
    # per block: 3 of 12 heads (3 x (384x96 + 96) + 384x96) and 384 of 1536 neurons
    assert removed == 6 * (3 * (384 * 96 + 96) + 384 * 96 + 384 * 384 + 384 + 384 * 384)
    loaded = load_pruned(tmp_path / "pruned")
    with torch.no_grad():
        for candidate in (model, loaded):
            logits = candidate(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
            assert torch.allclose(logits, masked, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_four_weights_become_semi_structured_on_a_gpu() -> None:
    from lightning_3d.pruning import n_m_mask, to_semi_structured

    linear = torch.nn.Linear(128, 128).half().cuda()
    with torch.no_grad():
        linear.weight.mul_(n_m_mask(linear.weight.abs(), 2, 4, 0.5))
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    expected = linear(x)
    model = to_semi_structured(torch.nn.Sequential(linear))
    assert type(model[0].weight).__name__.startswith("SparseSemiStructuredTensor")
    assert torch.allclose(model(x), expected, atol=1e-2, rtol=1e-2)
