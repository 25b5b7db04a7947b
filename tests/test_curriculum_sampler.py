"""CurriculumSampler in real Lightning runs: plans, budget, scores, resume, weights, errors.

A small linear classifier on a fixed synthetic dataset keeps these runs to a second each; the
Rotten Tomatoes label-noise test uses the real MiniLM.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from lightning_3d.callbacks import CurriculumSampler
from lightning_3d.curriculum import (
    CurriculumSchedule,
    group_by_length,
    infobatch_keep,
    padded_tokens,
    pool_size,
    rank_shard,
)
from lightning_3d.curriculum_state import GROUPING_SEED_OFFSET, CurriculumState
from lightning_3d.data import WithIndex
from lightning_3d.sampling import with_curriculum
from lightning_3d.tasks import total_training_steps, weighted_mean

COUNT, BATCH = 60, 4


class Points(Dataset):
    """Fixed 8-d points labelled by the sign of their first coordinate; ``quality`` is ``-i``."""

    def __init__(self, count: int = COUNT, with_index: bool = True) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(count, 8, generator=generator)
        self.y = (self.x[:, 0] > 0).long()
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"x": self.x[i], "labels": self.y[i], "quality": -float(i)}
        return {**item, "index": i} if self.with_index else item


class Texts(Points):
    """Points with a ``"text"`` of uneven length: what ``group_by_length`` sorts by."""

    lengths = torch.randint(1, 30, (COUNT,), generator=torch.Generator().manual_seed(2))

    def __getitem__(self, i: int) -> dict[str, Any]:
        return super().__getitem__(i) | {"text": "w" * int(self.lengths[i])}


class Classifier(pl.LightningModule):
    """Records the indices of every training batch, per epoch."""

    def __init__(self, data: Dataset | None = None, weighted: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)
        )
        self.data = data if data is not None else Points()
        self.weighted = weighted
        self.batches: list[tuple[int, list[int]]] = []
        self.losses: dict[int, list[float]] = defaultdict(list)
        self.feature_norms: dict[int, list[float]] = defaultdict(list)
        self.validations = 0
        self.total_steps: int | float | None = None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        logits = self.net(batch["x"])
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
        self.batches.append((self.current_epoch, batch["index"].tolist()))
        features = self.net[1](self.net[0](batch["x"]))  # the input of the last Linear
        norms = features.pow(2).sum(1).sqrt().tolist()
        for i, loss, norm in zip(batch["index"].tolist(), losses.tolist(), norms, strict=True):
            self.losses[i].append(loss)
            self.feature_norms[i].append(norm)
        loss = weighted_mean(losses, batch) if self.weighted else losses.mean()
        return {
            "loss": loss,
            "per_sample_loss": losses.detach(),
            "index": batch["index"],
            "logits": logits.detach(),
        }

    def score_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        logits = self.net(batch["x"])
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
        return {"per_sample_loss": losses, "index": batch["index"], "logits": logits}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.validations += 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.total_steps = total_training_steps(self.trainer)
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self) -> DataLoader:
        return with_curriculum(self.trainer, DataLoader(self.data, batch_size=BATCH, shuffle=True))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(Points(8), batch_size=BATCH)

    def epoch_indices(self, epoch: int) -> list[int]:
        return [i for e, batch in self.batches if e == epoch for i in batch]


def fit(
    curriculum: CurriculumSampler,
    module: Classifier | None = None,
    epochs: int = 4,
    callbacks: tuple[Callback, ...] = (),
    ckpt_path: str | None = None,
    loader: DataLoader | None = None,
) -> tuple[Classifier, pl.Trainer]:
    module = module or Classifier()
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[curriculum, *callbacks],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return module, trainer


# -- the schedule (pure) ----------------------------------------------------------------------
def test_schedule_sizes_follow_warmup_budget_and_pacing() -> None:
    schedule = CurriculumSchedule(
        pacing="linear", start_fraction=0.4, full_at=1.0, budget=0.6, warmup_epochs=1, epochs=4
    )
    # warm-up: all 60; then budget keeps 36 and pacing takes 0.4, 0.6, 0.8 of them (t = 0, 1/3, 2/3)
    expected = [60, math.ceil(0.4 * 36), math.ceil((0.4 + 0.6 / 3) * 36), math.ceil(0.8 * 36)]
    assert [schedule.epoch_size(60, e) for e in range(4)] == expected


def test_schedule_plan_keeps_the_easiest_and_shuffles_reproducibly() -> None:
    schedule = CurriculumSchedule(budget=0.5, warmup_epochs=1, epochs=3)
    difficulty = torch.arange(10.0).flip(0)  # item 9 is easiest
    warmup, _ = schedule.plan(difficulty, 0, seed=1)
    assert sorted(warmup.tolist()) == list(range(10))
    order, weights = schedule.plan(difficulty, 1, seed=1)
    assert sorted(order.tolist()) == [5, 6, 7, 8, 9] and weights is None
    assert torch.equal(order, schedule.plan(difficulty, 1, seed=1)[0])
    assert not torch.equal(order, schedule.plan(difficulty, 2, seed=1)[0])  # new epoch, new shuffle
    hard = CurriculumSchedule(pacing="step", start_fraction=0.5, stages=1, hardest_first=True)
    assert sorted(hard.plan(difficulty, 1, seed=1)[0].tolist()) == [0, 1, 2, 3, 4]


def test_infobatch_drops_among_the_below_mean_samples() -> None:
    # mean 16: items 0-6 are below it; keeping 6 of 8 drops 2 of those 7 (not of the 4 easiest)
    difficulty = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 100])
    for seed in range(20):
        kept, weights = infobatch_keep(difficulty, 0.75, torch.Generator().manual_seed(seed))
        assert len(kept) == 6 and weights[7] == 1.0 and int((weights == 0).sum()) == 2
        assert sorted(weights[:7].tolist()) == [0.0, 0.0] + [pytest.approx(7 / 5)] * 5
    dropped = {i for seed in range(50) for i in torch.nonzero(
        infobatch_keep(difficulty, 0.75, torch.Generator().manual_seed(seed))[1] == 0
    ).flatten().tolist()}  # fmt: skip
    assert dropped == set(range(7))


def test_infobatch_weights_keep_every_sum_unbiased() -> None:
    difficulty = torch.rand(20)
    values = torch.randn(20)
    draws = []
    for seed in range(4000):
        kept, weights = infobatch_keep(difficulty, 0.7, torch.Generator().manual_seed(seed))
        assert kept.numel() == pool_size(0.7, 20) == 14
        assert torch.equal(weights.nonzero().flatten(), kept)
        assert weights.sum() == pytest.approx(20.0)  # sum of w over kept = n, every draw
        draws.append(float((weights * values).sum()))
    # E[sum_kept w x] = sum x: the mean of 4000 draws is within 4 standard errors
    mean, spread = torch.tensor(draws).mean(), torch.tensor(draws).std() / math.sqrt(len(draws))
    assert abs(mean - values.sum()) < 4 * spread
    # only well-learned samples (the 2 * 6 easiest) are ever dropped, at weight 12 / 6 = 2
    _, weights = infobatch_keep(difficulty, 0.7, torch.Generator().manual_seed(0))
    easiest = set(torch.argsort(difficulty)[:12].tolist())
    assert {i for i in range(20) if weights[i] == 0} <= easiest
    assert sorted(set(weights.tolist())) == [0.0, 1.0, 2.0]


# -- the callback in Lightning runs ----------------------------------------------------------
def test_epochs_visit_the_planned_pools_and_lightning_follows_their_lengths() -> None:
    curriculum = CurriculumSampler(
        score="quality",
        pacing="linear",
        start_fraction=0.4,
        full_at=1.0,
        budget=0.6,
        balance_classes=False,
    )
    module, trainer = fit(curriculum)
    for epoch in range(4):
        seen = module.epoch_indices(epoch)
        size = curriculum.schedule.epoch_size(COUNT, epoch)
        assert len(seen) == len(set(seen)) == size  # each planned sample exactly once
        assert sorted(seen) == list(range(size))  # quality = -index: the lowest indices are best
    # validation ran after every epoch (2 batches each, plus the 2-batch sanity check)
    assert module.validations == 2 + 4 * 2
    # the planned number of optimizer steps is the number Lightning ran
    assert (
        module.total_steps
        == trainer.global_step
        == sum(math.ceil(curriculum.schedule.epoch_size(COUNT, e) / BATCH) for e in range(4))
    )


def lowest_by_class(losses: torch.Tensor, labels: torch.Tensor, total: int) -> set[int]:
    """Worked by hand for two classes: each class gets its share of ``total`` (the class with
    the larger fractional part takes the odd one) and keeps its lowest losses."""
    sizes = [int((labels == c).sum()) for c in (0, 1)]
    quotas = [size * total / len(labels) for size in sizes]
    takes = [math.floor(q) for q in quotas]
    if sum(takes) < total:
        takes[0 if quotas[0] % 1 >= quotas[1] % 1 else 1] += 1
    kept: set[int] = set()
    for c, take in zip((0, 1), takes, strict=True):
        members = torch.nonzero(labels == c).flatten()
        kept |= set(members[torch.argsort(losses[members])[:take]].tolist())
    return kept


@pytest.mark.parametrize("balance_classes", [True, False])
def test_loss_budget_keeps_exactly_the_lowest_ema_losses(balance_classes: bool) -> None:
    curriculum = CurriculumSampler(
        score="loss", budget=0.3, ema_decay=0.5, seed=3, balance_classes=balance_classes
    )
    module, _ = fit(curriculum, epochs=3)
    labels = module.data.y
    assert sorted(module.epoch_indices(0)) == list(range(COUNT))
    # scores after epoch 0 are the losses seen in epoch 0; epoch 1 keeps the 18 lowest (per class
    # in proportion to its size, or overall)
    epoch0 = torch.tensor([module.losses[i][0] for i in range(COUNT)])
    kept = module.epoch_indices(1)
    assert len(kept) == len(set(kept)) == pool_size(0.3, COUNT) == 18

    def lowest(losses: torch.Tensor) -> set[int]:
        if balance_classes:
            return lowest_by_class(losses, labels, 18)
        return set(torch.argsort(losses)[:18].tolist())

    assert set(kept) == lowest(epoch0)
    # after epoch 1: s = 0.5 * s0 + 0.5 * s1 for the kept ones, unchanged for the dropped ones
    expected = epoch0.clone()
    for i in kept:
        expected[i] = 0.5 * module.losses[i][0] + 0.5 * module.losses[i][1]
    assert set(module.epoch_indices(2)) == lowest(expected)
    if balance_classes:  # the class shares of the kept data are those of the whole data
        share = float(labels.float().mean())
        assert abs(float(labels[kept].float().mean()) - share) <= 1 / 18


@pytest.mark.parametrize("score", ["el2n", "grand"])
def test_el2n_and_grand_scores_match_their_definitions(score: str) -> None:
    curriculum = CurriculumSampler(score=score, budget=0.5, ema_decay=0.0)
    module, _ = fit(curriculum, epochs=2)
    # decay 0: a sample trained on in epoch 1 scores the value of its epoch-1 step. With 2 classes
    # ||softmax(z) - onehot(y)|| = sqrt(2) (1 - p_y), p_y = exp(-loss); GraNd multiplies it by
    # sqrt(||h||^2 + 1) with h the input of the last Linear (found without being named).
    trained = module.epoch_indices(1)
    assert len(trained) == 30
    for i in trained:
        expected = math.sqrt(2) * (1 - math.exp(-module.losses[i][1]))
        if score == "grand":
            expected *= math.sqrt(module.feature_norms[i][1] ** 2 + 1)
        # 1 - exp(-loss) loses digits for small float32 losses: compare to 1e-4
        assert float(curriculum.scores[i]) == pytest.approx(expected, rel=1e-4)


def test_scoring_pass_rescores_dropped_samples() -> None:
    class Snapshot(Callback):
        def on_train_epoch_end(self, trainer, module) -> None:
            if trainer.current_epoch == 1:
                self.scores = curriculum.scores.clone()
                with torch.no_grad():
                    logits = module.net(module.data.x)
                self.losses = F.cross_entropy(logits, module.data.y, reduction="none")

    curriculum = CurriculumSampler(score="loss", budget=0.5, ema_decay=0.0, scoring_epochs=[1])
    snapshot = Snapshot()  # runs after the curriculum's own epoch end
    module, _ = fit(curriculum, epochs=3, callbacks=(snapshot,))
    trained = set(module.epoch_indices(1))
    for i in range(COUNT):
        # decay 0: the epoch mean of the pass' loss and, for trained samples, their step loss
        observed = [float(snapshot.losses[i])] + ([module.losses[i][1]] if i in trained else [])
        expected = sum(observed) / len(observed)
        assert float(snapshot.scores[i]) == pytest.approx(expected, rel=1e-5)


def test_rescale_loss_puts_unbiased_weights_in_the_batch() -> None:
    class WeightRecorder(Callback):
        def __init__(self) -> None:
            self.weights: dict[int, float] = {}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if "sample_weight" in batch:
                for i, w in zip(
                    batch["index"].tolist(), batch["sample_weight"].tolist(), strict=True
                ):
                    self.weights[i] = w

    curriculum = CurriculumSampler(budget=0.75, budget_drops="easiest_random", rescale_loss=True)
    recorder = WeightRecorder()
    module, _ = fit(curriculum, epochs=2, callbacks=(recorder,))
    kept = module.epoch_indices(1)
    assert len(kept) == pool_size(0.75, COUNT) == 45
    assert set(recorder.weights) == set(kept)
    # 15 dropped from m >= 30 candidates (the below-mean ones, at least the 30 easiest): the
    # m - 15 kept candidates weigh m / (m - 15), the others 1
    heavy = [w for w in recorder.weights.values() if w != 1.0]
    candidates = len(heavy) + 15
    assert candidates >= 30
    assert all(w == pytest.approx(candidates / (candidates - 15)) for w in heavy)
    assert sum(recorder.weights.values()) == COUNT


def test_rescale_loss_refuses_a_training_step_that_ignores_the_weights() -> None:
    curriculum = CurriculumSampler(budget=0.5, budget_drops="easiest_random", rescale_loss=True)
    with pytest.raises(RuntimeError, match="ignored batch\\['sample_weight'\\]"):
        fit(curriculum, Classifier(weighted=False), epochs=2)


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("stop_step", [17, 21])  # mid epoch 1 and mid epoch 2
def test_mid_epoch_resume_continues_the_same_order(tmp_path: Path, stop_step: int) -> None:
    def settings() -> CurriculumSampler:
        return CurriculumSampler(
            score="loss", pacing="root", start_fraction=0.3, full_at=1.0, budget=0.8, seed=7
        )

    full, _ = fit(settings(), epochs=4)
    checkpoints = ModelCheckpoint(tmp_path, every_n_train_steps=1, save_top_k=-1)
    fit(settings(), epochs=4, callbacks=(checkpoints, StopAt(stop_step)))
    path = next(tmp_path.glob(f"*step={stop_step}.ckpt"))
    resumed, trainer = fit(settings(), epochs=4, ckpt_path=str(path))
    assert resumed.batches == full.batches[stop_step:]
    assert trainer.global_step == len(full.batches)
    for a, b in zip(resumed.parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_group_by_length_batches_similar_lengths_and_resumes_mid_epoch(tmp_path: Path) -> None:
    def settings() -> CurriculumSampler:
        return CurriculumSampler(budget=0.8, seed=7, group_by_length=3, length_key="text")

    full, trainer = fit(settings(), Classifier(Texts()), epochs=3)
    plain, _ = fit(CurriculumSampler(budget=0.8, seed=7), Classifier(Texts()), epochs=3)
    # the warm-up epoch: the same seeded shuffle, in batches grouped from windows of 3 batches
    epoch_seed = 7 * 1_000_003
    shuffled = torch.randperm(COUNT, generator=torch.Generator().manual_seed(epoch_seed))
    regroup = torch.Generator().manual_seed(epoch_seed + GROUPING_SEED_OFFSET)
    grouped = group_by_length(shuffled, Texts.lengths, BATCH, 3, regroup)
    assert plain.epoch_indices(0) == shuffled.tolist()
    assert full.epoch_indices(0) == grouped.tolist()
    for epoch in range(3):  # the budget's epochs too: each pads less than the plain run's
        ours, theirs = (torch.tensor(m.epoch_indices(epoch)) for m in (full, plain))
        assert len(ours) == len(theirs)
        assert padded_tokens(Texts.lengths, ours, BATCH) < padded_tokens(
            Texts.lengths, theirs, BATCH
        )
    last = torch.tensor(full.epoch_indices(2))
    ratio = padded_tokens(Texts.lengths, last, BATCH) / int(Texts.lengths[last].sum())
    assert float(trainer.callback_metrics["curriculum/padding_ratio"]) == pytest.approx(ratio)
    # stopped in epoch 1 (15 batches, then 12), resumed: the same batches as without the stop
    checkpoints = ModelCheckpoint(tmp_path, every_n_train_steps=1, save_top_k=-1)
    fit(settings(), Classifier(Texts()), epochs=3, callbacks=(checkpoints, StopAt(20)))
    path = next(tmp_path.glob("*step=20.ckpt"))
    resumed, _ = fit(settings(), Classifier(Texts()), epochs=3, ckpt_path=str(path))
    assert resumed.batches == full.batches[20:]


def test_group_by_length_without_the_length_column_fails_before_training() -> None:
    module = Classifier()
    with pytest.raises(ValueError, match=r"length of each item's 'input_ids'.*length_key"):
        fit(CurriculumSampler(group_by_length=2), module)
    assert module.batches == []


def test_the_loader_position_is_in_the_checkpoint_and_resumes_without_a_warning(
    tmp_path: Path,
) -> None:
    """The training loader carries its position through Lightning's public resumable-loader
    interface (``state_dict``/``load_state_dict``): no 'not resumable' warning on a mid-epoch
    resume. If Lightning stops calling it, the checkpoint loses the entry and this fails."""
    checkpoints = ModelCheckpoint(tmp_path, every_n_train_steps=1, save_top_k=-1)
    fit(CurriculumSampler(budget=0.5), epochs=3, callbacks=(checkpoints, StopAt(18)))
    path = next(tmp_path.glob("*step=18.ckpt"))
    loops = torch.load(path, weights_only=False)["loops"]["fit_loop"]["state_dict"]
    # epoch 0 runs 15 batches of 60 samples; epoch 1 keeps 30 samples: 3 of its batches done
    assert loops["combined_loader"] == [{"epoch": 1, "batches_done": 3}]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not resumable")
        _, trainer = fit(CurriculumSampler(budget=0.5), epochs=3, ckpt_path=str(path))
    assert trainer.global_step == 15 + 8 + 8


def test_a_plain_loader_passed_to_fit_is_wrapped_once_and_plans_like_the_hook() -> None:
    from_hook, _ = fit(CurriculumSampler(budget=0.5, seed=3), epochs=3)

    class NoHook(Classifier):
        train_dataloader = None  # type: ignore[assignment]

    curriculum = CurriculumSampler(budget=0.5, seed=3)
    loader = curriculum.wrap_train_dataloader(DataLoader(Points(), batch_size=BATCH))
    assert curriculum.wrap_train_dataloader(loader) is loader
    module, _ = fit(curriculum, NoHook(), epochs=3, loader=loader)
    assert module.batches == from_hook.batches


def test_a_loader_without_the_curriculum_sampler_is_refused_before_the_first_step() -> None:
    class Unwrapped(Classifier):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.data, batch_size=BATCH, shuffle=True)

    module = Unwrapped()
    with pytest.raises(RuntimeError, match=r"does not have it: return `with_curriculum\(self"):
        fit(CurriculumSampler(budget=0.5), module)
    assert module.batches == []


def test_items_without_an_index_get_a_clear_error_and_with_index_fixes_it() -> None:
    module = Classifier(data=Points(with_index=False))
    with pytest.raises(ValueError, match=r"'index' entry.*WithIndex"):
        fit(CurriculumSampler(), module)
    assert WithIndex(Points(with_index=False))[5]["index"] == 5


def test_missing_per_sample_losses_get_a_clear_error() -> None:
    class PlainLoss(Classifier):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch["x"]), batch["labels"])

    with pytest.raises(RuntimeError, match="per_sample_loss"):
        fit(CurriculumSampler(), PlainLoss())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"score": "entropy"}, "score must be one of"),
        ({"pacing": "cosine"}, "pacing must be one of"),
        ({"start_fraction": 0.0}, "start_fraction must be in"),
        ({"full_at": 1.5}, "full_at must be in"),
        ({"stages": 0}, "stages must be"),
        ({"budget": 0.0}, "budget must be in"),
        ({"budget": 1.2}, "budget must be in"),
        ({"budget_drops": "random"}, "budget_drops must be one of"),
        ({"rescale_loss": True}, "rescale_loss=True needs budget_drops='easiest_random'"),
        ({"warmup_epochs": 0}, "warmup_epochs must be >= 1 .* or prescore=True"),
        ({"prescore": True, "score": "quality"}, "prescore scores from the model"),
        ({"warmup_epochs": -1, "score": "quality"}, "warmup_epochs and anneal_epochs must be"),
        ({"anneal": 1.0}, r"anneal must be in \[0, 1\), got 1.0"),
        ({"ema_decay": 1.0}, "ema_decay must be in"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"scoring_epochs": [-1]}, "scoring_epochs must be"),
        ({"scoring_epochs": [1], "score": "quality"}, "score='quality' is static"),
        ({"gather_every": 0}, "gather_every must be a positive integer, got 0"),
        ({"group_by_length": -1}, r"group_by_length must be >= 0 \(0: off\), got -1"),
        ({"group_by_length": True}, "group_by_length is the number of batches .* got True"),
    ],
)
def test_bad_arguments_raise_a_clear_value_error(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CurriculumSampler(**arguments)


def test_settings_that_cannot_work_fail_before_training() -> None:
    with pytest.raises(ValueError, match="leave no epoch for the curriculum"):
        fit(CurriculumSampler(budget=0.5, warmup_epochs=2), epochs=2)
    with pytest.raises(ValueError, match="head='missing' is not a module"):
        fit(CurriculumSampler(score="grand", head="missing"), epochs=2)
    with pytest.raises(ValueError, match="reads each item's 'stars' value"):
        fit(CurriculumSampler(score="quality", quality_key="stars"), epochs=2)

    class NoScoring(Classifier):
        score_batch = None

    with pytest.raises(ValueError, match="score_batch"):
        fit(CurriculumSampler(scoring_epochs=[0]), NoScoring(), epochs=2)


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_ranks_share_one_order_and_take_equal_disjoint_parts(
    world: int, tmp_path: Path, launch_two_ranks: Any
) -> None:
    launched = launch_two_ranks("curriculum", tmp_path, timeout=900, ranks=world)
    for rank, result in enumerate(launched):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stdout[-6000:]}"
    ranks = [json.loads((tmp_path / f"curriculum.rank{r}.json").read_text()) for r in range(world)]
    for strategy in ("ddp", "ddp_gather_every_batch", "ddp_gather_every_3", "fsdp_compressed"):
        runs = [output[strategy] for output in ranks]
        for run in runs[1:]:
            assert run["plans"] == runs[0]["plans"]  # the same global order on every rank
            assert run["scores"] == runs[0]["scores"]  # from the same all-gathered scores
            assert run["steps"] == runs[0]["steps"]
        for epoch, order in runs[0]["plans"].items():
            order = torch.tensor(order)
            parts = [rank_shard(order, r, world).tolist() for r in range(world)]
            assert [run["seen"][epoch] for run in runs] == parts
            assert len({len(part) for part in parts}) == 1  # no rank waits on another
            assert set().union(*map(set, parts)) == set(order.tolist())
        sizes = [len(runs[0]["plans"][str(e)]) for e in range(3)]
        assert sizes == [60, math.ceil(0.4 * 48), math.ceil(0.7 * 48)]
    # gathering after every batch, every 3 or at epoch ends only: the same plans and scores
    for every in ("ddp_gather_every_batch", "ddp_gather_every_3"):
        assert ranks[0][every]["plans"] == ranks[0]["ddp"]["plans"]
        assert ranks[0][every]["scores"] == ranks[0]["ddp"]["scores"]
    # grouped by length: the plan is the epoch's seeded shuffle grouped in global batches of
    # 4 items a rank (world * 4 consecutive items: each rank's batch comes from one group)
    grouped = [output["ddp_grouped"] for output in ranks]
    lengths = torch.tensor(grouped[0]["lengths"])
    for epoch in range(3):
        epoch_seed = 5 * 1_000_003 + epoch
        shuffled = torch.randperm(60, generator=torch.Generator().manual_seed(epoch_seed))
        regroup = torch.Generator().manual_seed(epoch_seed + GROUPING_SEED_OFFSET)
        expected = group_by_length(shuffled, lengths, 4 * world, 2, regroup)
        for rank, run in enumerate(grouped):
            assert run["plans"][str(epoch)] == expected.tolist()
            assert run["seen"][str(epoch)] == rank_shard(expected, rank, world).tolist()
        padded = padded_tokens(lengths, expected, 4 * world)
        assert padded < padded_tokens(lengths, shuffled, 4 * world)


@pytest.mark.slow  # trains MiniLM for 3 epochs; the selection rule is tested on Points
def test_loss_budget_drops_mostly_flipped_labels_on_rotten_tomatoes(minilm_tokenizer) -> None:
    """Real MiniLM, 800 Rotten Tomatoes reviews with 20% of their labels flipped: after two
    warm-up epochs on all of them, the 80% budget keeps the lowest loss EMAs, and the 20% it
    drops is far richer in flipped labels than a random 20% (precision 0.2)."""
    from lightning_3d.data import IndexedDataset, RottenTomatoes, flip_labels
    from lightning_3d.tasks import SequenceClassificationTask

    pl.seed_everything(0, verbose=False)
    task = SequenceClassificationTask(learning_rate=1e-4, warmup_ratio=0.0)
    data = RottenTomatoes(tokenizer=minilm_tokenizer, batch_size=16, max_length=48)
    data.setup("fit")
    train = data.splits["train"]
    labels, flipped = flip_labels(train.labels[:800], 0.2, 2, seed=0)
    data.splits["train"] = IndexedDataset(train.input_ids[:800], labels)
    curriculum = CurriculumSampler(score="loss", budget=0.8, warmup_epochs=2, epochs=3)
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[curriculum],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(task, datamodule=data)
    kept = set(curriculum.current_plan().order.tolist())  # the plan of epoch 2
    dropped = set(range(800)) - kept
    assert len(dropped) == 160
    precision = len(dropped & set(flipped)) / len(dropped)
    # Measured with this recipe: 0.55, 0.51, 0.46 for seeds 0, 1, 2 (labels flipped with the same
    # seed); after a single warm-up epoch only 0.24-0.37. Half the dropped part being mislabelled
    # where a fifth is mislabelled overall is the effect; 0.4 leaves room for numerics.
    assert precision >= 0.4


def test_a_budget_in_a_one_epoch_run_scores_before_training(caplog) -> None:
    """With the default warm-up there would be no curriculum epoch: a forward-only pass scores
    every sample first, and the one epoch trains on the easiest half."""
    data = Points()
    scorer = Classifier(data)  # the same seeded initial weights as the trained module
    with torch.no_grad():
        batch = {"x": data.x, "labels": data.y, "index": torch.arange(len(data))}
        losses = scorer.score_batch(batch)["per_sample_loss"]
    expected = set(torch.argsort(losses)[: math.ceil(0.5 * len(data))].tolist())
    sampler = CurriculumSampler(budget=0.5, balance_classes=False)
    with caplog.at_level("INFO"):
        module, _ = fit(sampler, Classifier(data), epochs=1)
    assert set(module.epoch_indices(0)) == expected
    assert len(module.epoch_indices(0)) == len(expected)
    assert "scored by a forward-only pass before training" in caplog.text
    # an explicit warm-up epoch is the user's choice: still refused, naming the way out
    with pytest.raises(ValueError, match="score_batch"):
        fit(CurriculumSampler(budget=0.5, warmup_epochs=1), Classifier(data), epochs=1)


def test_a_checkpoint_of_another_dataset_and_a_loader_it_cannot_use_are_refused() -> None:
    items = [{"index": i, "x": float(i)} for i in range(8)]
    curriculum = CurriculumSampler(budget=0.5)
    curriculum.wrap_train_dataloader(DataLoader(items, batch_size=4))
    other = CurriculumSampler(budget=0.5)
    other.wrap_train_dataloader(DataLoader(items[:6], batch_size=4))
    with pytest.raises(ValueError, match=r"has 8 samples but the checkpoint's .* built for 6"):
        curriculum.load_state_dict(other.state_dict())
    sampler = curriculum.sampler
    with pytest.raises(ValueError, match=r"orders a single torch DataLoader; .* is a list"):
        curriculum.wrap_train_dataloader(items)  # type: ignore[arg-type]
    assert curriculum.sampler is sampler  # a refused loader leaves the callback as it was


def test_the_state_changes_only_when_a_dataset_passes_every_check() -> None:
    state = CurriculumState(CurriculumSchedule(budget=0.5, warmup_epochs=0, epochs=2), "quality")
    with pytest.raises(ValueError, match="reads each item's 'quality' value"):
        state.attach([{"index": i, "q": 1.0} for i in range(4)], "quality", batch_size=8)
    assert not state.attached and state.batch_size == 1
    items = [{"index": i, "quality": float(i), "labels": i % 2} for i in range(4)]
    state.attach(items, "quality", batch_size=2)
    assert state.table.scores.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert state.table.labels.tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="has 3 samples but CurriculumSampler's state was built"):
        state.attach(items[:3], "quality", batch_size=5)
    assert state.batch_size == 2 and state.table.count == 4
    # the budget keeps the better half within each class: 2 (class 0) and 3 (class 1)
    state.clock = lambda: 0
    assert sorted(state.current_plan().order.tolist()) == [2, 3]
    state.batches_done = 1
    assert state.consumed_samples == 2 and state.position() == (0, 1)
    with pytest.raises(ValueError, match=r"checkpoint is at epoch 1 but .* the plan of epoch 0"):
        state.resume_at(1, 0)
    # two epochs of 2 samples: one batch of 2 each, one step each (accumulating 2 batches too:
    # an epoch's last batches step)
    assert state.planned_steps(2, replicas=1, batch_size=2, drop_last=False) == 2
    assert state.planned_steps(2, 1, 2, False, accumulate=2) == 2
    assert state.planned_steps(2, 1, 3, drop_last=True) == 0
    assert state.planned_steps(2, 1, 1, False, max_steps=3) == 3
