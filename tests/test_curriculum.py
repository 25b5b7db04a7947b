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
    group_by_length,
    lowest_per_group,
    pacing_fraction,
    padded_lengths,
    padded_tokens,
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


def test_group_by_length_sorts_each_window_and_shuffles_whole_batches() -> None:
    # 11 items, batches of 2, windows of 2 batches (4 items): windows [0..3], [4..7], [8..10]
    lengths = torch.tensor([9, 1, 7, 3, 8, 2, 6, 4, 5, 10, 0])
    order = torch.arange(11)
    grouped = group_by_length(order, lengths, 2, 2, torch.Generator().manual_seed(0))
    # sorted windows: [1, 3, 2, 0], [5, 7, 6, 4], [10, 8, 9]; cut into batches of 2, the
    # full ones shuffled, the short one (the last window's longest, item 9) last
    batches = {(1, 3), (2, 0), (5, 7), (6, 4), (10, 8)}
    assert {tuple(pair) for pair in grouped[:10].view(5, 2).tolist()} == batches
    assert grouped[10].item() == 9
    assert sorted(grouped.tolist()) == list(range(11))  # the same items, each once
    other = group_by_length(order, lengths, 2, 2, torch.Generator().manual_seed(1))
    assert other.tolist() != grouped.tolist()  # another seed, another batch order
    # padding, lengths by batch: [9,1] [7,3] [8,2] [6,4] [5,10] [0] as given: 2 * (9 + 7 + 8
    # + 6 + 10) + 0 = 80; grouped: [1,3] [7,9] [2,4] [6,8] [0,5] [10]: 2 * (3 + 9 + 4 + 8 + 5)
    # + 10 = 68
    assert padded_tokens(lengths, order, 2) == 80
    assert padded_tokens(lengths, grouped, 2) == 68
    assert sorted(padded_lengths(lengths, grouped, 2).tolist()) == [3, 4, 5, 8, 9, 10]
    assert padded_tokens(lengths, order[:0], 2) == 0  # an empty epoch pads nothing
    with pytest.raises(ValueError, match="batch_size and window must be >= 1"):
        group_by_length(order, lengths, 2, 0, torch.Generator())


def test_group_by_length_of_one_window_keeps_its_sorted_batches() -> None:
    lengths = torch.tensor([4, 2, 3, 1])
    grouped = group_by_length(torch.arange(4), lengths, 2, 8, torch.Generator().manual_seed(0))
    assert {tuple(pair) for pair in grouped.view(2, 2).tolist()} == {(3, 1), (2, 0)}
