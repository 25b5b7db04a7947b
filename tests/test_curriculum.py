"""The data axis' pure functions: scores, pacing, order, budget, sharding."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_3d.curriculum import (
    budget_keep,
    curriculum_order,
    el2n,
    fold_epoch_scores,
    grand_last_layer,
    lowest_per_group,
    pacing_fraction,
    proportional_counts,
    rank_shard,
)


@pytest.mark.parametrize(
    ("pacing", "progress", "expected"),
    [
        # c0 = 0.2, T = 0.5, 4 stages; worked by hand
        ("none", 0.0, 1.0),
        ("linear", 0.0, 0.2),
        ("linear", 0.25, 0.2 + 0.8 * 0.5),  # 0.6
        ("linear", 0.5, 1.0),
        ("linear", 0.9, 1.0),
        ("root", 0.0, 0.2),
        ("root", 0.25, math.sqrt(0.04 + 0.96 * 0.5)),  # 0.7211
        ("root", 0.5, 1.0),
        ("step", 0.1, 0.2),  # floor(4 * 0.2) = 0
        ("step", 0.3, 0.2 + 0.8 * 2 / 4),  # floor(4 * 0.6) = 2: 0.6
        ("step", 0.49, 0.2 + 0.8 * 3 / 4),  # floor(3.92) = 3: 0.8
        ("exponential", 0.0, 0.2),
        ("exponential", 0.25, 0.2 * 5**0.5),  # 0.4472
        ("exponential", 0.5, 1.0),
    ],
)
def test_pacing_against_hand_computed_values(pacing, progress, expected):
    fraction = pacing_fraction(progress, pacing, start_fraction=0.2, full_at=0.5, stages=4)
    assert fraction == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"pacing": "cosine"}, "pacing"),
        ({"start_fraction": 0.0}, "start_fraction"),
        ({"start_fraction": 1.5}, "start_fraction"),
        ({"full_at": 0.0}, "full_at"),
        ({"stages": 0}, "stages"),
    ],
)
def test_bad_pacing_arguments(kwargs, name):
    arguments = {"pacing": "linear", "start_fraction": 0.2, "full_at": 0.5, "stages": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        pacing_fraction(0.1, **arguments)


def test_el2n_hand_example():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    labels = torch.tensor([0, 0])
    # p = (1/2, 1/2): error (-1/2, 1/2); p = (3/4, 1/4): error (-1/4, 1/4)
    assert el2n(logits, labels).tolist() == pytest.approx([0.5**0.5, 0.125**0.5])


def test_grand_equals_the_autograd_gradient_norm_of_the_classifier():
    torch.manual_seed(0)
    classifier = torch.nn.Linear(6, 3)
    features = torch.randn(5, 6)
    labels = torch.tensor([0, 2, 1, 1, 0])
    logits = classifier(features)
    expected = []
    for i in range(5):
        classifier.zero_grad()
        torch.nn.functional.cross_entropy(logits[i : i + 1], labels[i : i + 1]).backward(
            retain_graph=True
        )
        squared = classifier.weight.grad.pow(2).sum() + classifier.bias.grad.pow(2).sum()
        expected.append(float(squared.sqrt()))
    assert grand_last_layer(logits, labels, features).tolist() == pytest.approx(expected, rel=1e-5)


def test_epoch_scores_fold_into_an_ema_started_at_the_first_mean():
    scores, seen = torch.zeros(3), torch.zeros(3, dtype=torch.bool)
    # epoch 1: item 0 seen twice (losses 1 and 3), item 2 once (4), item 1 not at all
    fold_epoch_scores(
        scores, seen, torch.tensor([4.0, 0.0, 4.0]), torch.tensor([2, 0, 1]), decay=0.5
    )
    assert scores.tolist() == [2.0, 0.0, 4.0] and seen.tolist() == [True, False, True]
    # epoch 2: item 0 mean 6, item 1 first seen with 1
    fold_epoch_scores(
        scores, seen, torch.tensor([6.0, 1.0, 0.0]), torch.tensor([1, 1, 0]), decay=0.5
    )
    assert scores.tolist() == [0.5 * 2.0 + 0.5 * 6.0, 1.0, 4.0]
    with pytest.raises(ValueError, match="decay"):
        fold_epoch_scores(scores, seen, scores, torch.ones(3), decay=1.0)


def test_curriculum_order_takes_the_easiest_and_is_reproducible():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.1, 0.7])
    order = curriculum_order(scores, fraction=0.5, seed=3)
    assert sorted(order.tolist()) == [1, 3, 4]  # ceil(0.5 * 6) = 3 easiest
    assert torch.equal(order, curriculum_order(scores, fraction=0.5, seed=3))
    hardest = curriculum_order(scores, fraction=0.34, seed=3, hardest_first=True)
    assert sorted(hardest.tolist()) == [0, 2, 5]  # ceil(0.34 * 6) = ceil(2.04) = 3 hardest
    third = curriculum_order(scores, fraction=1 / 3, seed=3)  # 6 / 3 is 2, not ceil(2 + 1 ulp)
    assert sorted(third.tolist()) == [1, 4]
    tie = curriculum_order(torch.zeros(4), fraction=0.5, seed=0)
    assert sorted(tie.tolist()) == [0, 1]  # ties go to the lower index


def test_budget_keeps_exactly_the_budget():
    difficulty = torch.tensor([0.2, 3.0, 0.1, 0.2, 9.0, 0.5, 0.3, 0.4, 0.6, 0.7])
    kept = budget_keep(difficulty, 0.3)
    assert kept.tolist() == [0, 2, 3]  # 3 lowest; 0.2 twice, the lower index first
    assert budget_keep(difficulty, 1.0).tolist() == list(range(10))
    with pytest.raises(ValueError, match="budget"):
        budget_keep(difficulty, 0.0)


@pytest.mark.parametrize("count", [6, 7, 1])
def test_rank_shards_have_equal_length_and_cover_everything(count):
    order = torch.randperm(count)
    shards = [rank_shard(order, rank, 2) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == math.ceil(count / 2)
    assert set(torch.cat(shards).tolist()) == set(order.tolist())
    with pytest.raises(ValueError, match="rank"):
        rank_shard(order, 2, 2)


def test_proportional_counts_use_the_largest_remainder() -> None:
    # 7 of 10 over sizes 5, 3, 2: quotas 3.5, 2.1, 1.4 -> floors 3, 2, 1, the spare to 3.5
    assert proportional_counts(torch.tensor([5, 3, 2]), 7).tolist() == [4, 2, 1]
    # quotas 1.5, 1.5: the tie goes to the lower group
    assert proportional_counts(torch.tensor([3, 3]), 3).tolist() == [2, 1]
    assert proportional_counts(torch.tensor([4, 6]), 0).tolist() == [0, 0]


def test_lowest_per_group_keeps_each_groups_share() -> None:
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.9, 0.8, 0.7, 0.6])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert lowest_per_group(scores, 4).tolist() == [0, 1, 2, 3]  # all from group 0
    assert lowest_per_group(scores, 4, groups).tolist() == [0, 1, 6, 7]  # 2 + 2, lowest of each
