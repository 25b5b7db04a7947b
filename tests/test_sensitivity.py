"""Gradient statistics, sensitivity ranking and optimizer surgery, checked against numpy and
hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_3d.sensitivity import (
    GradientStatistics,
    add_to_optimizer,
    baseline_scores,
    composite_sensitivity,
    drop_from_optimizer,
    group_parameters,
    layerwise_lr_scales,
    optimizer_state_bytes,
    select_trainable,
    sensitivity_heatmap,
    split_param_groups,
    trainable_fraction_at,
    unit_scores,
    welford_merge,
)


def gradient_stream(steps: int = 7) -> list[dict[str, torch.Tensor]]:
    """Gradients with a non-zero mean and a scale that changes from step to step."""
    generator = torch.Generator().manual_seed(3)
    return [
        {
            "w": 0.3 + (1 + step) * torch.randn(4, 5, generator=generator),
            "b": -2.0 + torch.randn(4, generator=generator) * 1e-3,
        }
        for step in range(steps)
    ]


@pytest.mark.parametrize("granularity", ["tensor", "row", "element"])
def test_welford_statistics_equal_numpy_on_the_same_gradient_stream(granularity: str) -> None:
    stream = gradient_stream()
    statistics = GradientStatistics(granularity)
    for gradients in stream:
        statistics.update(gradients)
    for name in ("w", "b"):
        values = np.stack([g[name].double().numpy() for g in stream])  # [steps, *shape]
        if granularity == "tensor":
            samples = values.reshape(1, -1)  # one group, every value of every step
        elif granularity == "row":
            samples = np.moveaxis(values, 1, 0).reshape(values.shape[1], -1)
        else:
            samples = values.reshape(len(stream), -1).T  # one group per element, one per step
        mean, var = samples.mean(1), samples.var(1)
        tolerance = {"rtol": 1e-5, "atol": 1e-9}
        np.testing.assert_allclose(statistics.mean(name).numpy(), mean, **tolerance)
        np.testing.assert_allclose(statistics.variance(name).numpy(), var, **tolerance)
        fisher = np.square(samples).mean(1)
        np.testing.assert_allclose(statistics.fisher(name).numpy(), fisher, **tolerance)
        snr_tolerance = 5e-3 if granularity == "element" else 1e-6  # element state is float32
        np.testing.assert_allclose(statistics.snr(name).numpy(), mean**2 / var, rtol=snr_tolerance)
        assert statistics.count(name) == samples.shape[1]
        expected_last = float(np.square(values[-1]).sum())
        assert statistics.last_sq_norm(name) == pytest.approx(expected_last, rel=1e-6)
    per_tensor = statistics.tensor_metric("fisher")
    assert per_tensor["w"] == pytest.approx(float(np.square(values_of(stream, "w")).mean()))


def values_of(stream: list[dict[str, torch.Tensor]], name: str) -> np.ndarray:
    return np.stack([g[name].double().numpy() for g in stream])


def test_welford_merge_by_hand() -> None:
    # {1, 3} then {5, 7, 9}: n=5, mean 5, population variance 8
    count, mean, m2 = welford_merge(
        torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0), 2, torch.tensor(2.0),
        torch.tensor(2.0),
    )  # fmt: skip
    count, mean, m2 = welford_merge(count, mean, m2, 3, torch.tensor(7.0), torch.tensor(8.0))
    assert (count.item(), mean.item(), (m2 / count).item()) == (5.0, 5.0, 8.0)


def test_statistics_survive_a_state_dict_round_trip_and_refuse_another_granularity() -> None:
    stream = gradient_stream()
    whole, resumed = GradientStatistics("row"), GradientStatistics("row")
    for gradients in stream[:3]:
        whole.update(gradients)
    resumed.load_state_dict(whole.state_dict())
    for gradients in stream[3:]:
        whole.update(gradients)
        resumed.update(gradients)
    assert torch.equal(whole.variance("w"), resumed.variance("w")) and resumed.steps == 7
    with pytest.raises(ValueError, match=r"granularity='row'.*granularity='tensor'"):
        GradientStatistics("tensor").load_state_dict(whole.state_dict())
    with pytest.raises(ValueError, match="granularity must be one of"):
        GradientStatistics("channel")


def test_composite_is_per_element_and_weighs_its_three_terms() -> None:
    # ||g||^2 = 8, Fisher 0.5, ||theta - theta_0||^2 = 4 over 4 elements: 2 + 2*0.5 + 1
    assert composite_sensitivity(8.0, 0.5, 4.0, numel=4, alpha=2.0, beta=1.0) == 4.0
    assert composite_sensitivity(8.0, 0.5, 4.0, numel=4, alpha=0.0, beta=0.0) == 2.0


def test_units_scores_and_the_greedy_budget() -> None:
    names = ["emb.w", "l.0.a.w", "l.0.a.b", "l.1.a.w", "head.w"]
    assert group_parameters(names, "module") == {
        "emb": ["emb.w"], "l.0.a": ["l.0.a.w", "l.0.a.b"], "l.1.a": ["l.1.a.w"],
        "head": ["head.w"],
    }  # fmt: skip
    units = group_parameters(names, r"l\.\d+\.")
    assert units["l.0."] == ["l.0.a.w", "l.0.a.b"]
    sizes = {"emb.w": 100, "l.0.a.w": 30, "l.0.a.b": 10, "l.1.a.w": 40, "head.w": 5}
    scores = {"emb.w": 1.0, "l.0.a.w": 2.0, "l.0.a.b": 6.0, "l.1.a.w": 4.0, "head.w": 9.0}
    per_unit = unit_scores(units, scores, sizes)
    assert per_unit["l.0."] == pytest.approx((2.0 * 30 + 6.0 * 10) / 40)  # 3.0
    unit_sizes = {u: sum(sizes[n] for n in members) for u, members in units.items()}
    # densities: head 9 (5), l.1 4 (40), l.0 3 (40), emb 1 (100); a budget of 85 fits three
    assert select_trainable(per_unit, unit_sizes, 85) == ["head.w", "l.1.", "l.0."]
    # 50 fits head and l.1 (45); l.0 no longer fits and emb never does
    assert select_trainable(per_unit, unit_sizes, 50) == ["head.w", "l.1."]
    assert select_trainable(per_unit, unit_sizes, 50, contiguous=True) == ["head.w", "l.1."]
    assert select_trainable(per_unit, unit_sizes, 0) == []


def test_baselines_and_the_progressive_schedule() -> None:
    assert baseline_scores("depth", ["a", "b", "c"]) == {"a": 0.0, "b": 1.0, "c": 2.0}
    first, again = baseline_scores("random", list("abcd"), 5), baseline_scores("random", "abcd", 5)
    assert first == again and baseline_scores("random", list("abcd"), 6) != first
    assert [trainable_fraction_at(s, 3, 0.1) for s in (1, 2, 3, 4)] == pytest.approx(
        [0.7, 0.4, 0.1, 0.1]
    )


def test_layerwise_lr_scales_on_minilm_names(classifier_task) -> None:
    names = [n for n, _ in classifier_task.named_parameters()]
    scales = layerwise_lr_scales(names, 0.9)
    assert scales["model.bert.embeddings.word_embeddings.weight"] == pytest.approx(0.9**7)
    assert scales["model.bert.encoder.layer.0.attention.self.query.weight"] == pytest.approx(0.9**6)
    assert scales["model.bert.encoder.layer.5.output.dense.bias"] == pytest.approx(0.9)
    assert scales["model.classifier.weight"] == 1.0 and scales["model.bert.pooler.dense.bias"] == 1
    with pytest.raises(ValueError, match=r"lr_decay must be in \(0, 1\], got 1.5"):
        layerwise_lr_scales(names, 1.5)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(3, 64)).square().sum().backward()
    optimizer.step()


@pytest.mark.parametrize("kind", ["adamw", "adamw8bit"])
def test_dropping_parameters_releases_their_optimizer_state(kind: str) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
    if kind == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        expected = 2 * 4 * 128 * 64 + 2 * 4 * 128  # exp_avg and exp_avg_sq in fp32
    else:
        bnb = pytest.importorskip("bitsandbytes")
        optimizer = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3, min_8bit_size=4096)
        expected = None
    _step(model, optimizer)
    before = optimizer_state_bytes(optimizer)
    first = list(model[0].parameters())
    released = drop_from_optimizer(optimizer, first)
    assert all(p not in optimizer.state for p in first)
    assert all(all(p is not q for q in optimizer.param_groups[0]["params"]) for p in first)
    assert released == before - optimizer_state_bytes(optimizer) > 0
    if expected is not None:
        assert released == expected + 4 * 2  # plus the two scalar step counters
    for p in first:
        p.requires_grad_(False)
    frozen = [p.detach().clone() for p in first]
    _step(model, optimizer)
    assert all(torch.equal(p, q) for p, q in zip(first, frozen, strict=True))
    assert all(p not in optimizer.state for p in first)
    state = optimizer.state_dict()  # what a checkpoint holds: only the trainable parameters
    assert state["param_groups"][0]["params"] == [0, 1] and sorted(state["state"]) == [0, 1]


def test_a_step_with_non_finite_gradients_is_not_merged() -> None:
    statistics = GradientStatistics()
    assert statistics.update({"w": torch.tensor([1.0, 3.0])})
    assert not statistics.update({"w": torch.tensor([float("inf"), 3.0])})  # fp16 overflow
    assert statistics.steps == 1 and statistics.mean("w").item() == 2.0


def test_sharded_gradients_pool_to_the_statistics_of_the_whole_tensor() -> None:
    """Two shards of one gradient stream, summed by a stand-in for the all-reduce over ranks,
    give exactly the statistics of the unsharded stream."""
    stream = gradient_stream()
    whole = GradientStatistics()
    halves = [GradientStatistics(), GradientStatistics()]
    for gradients in stream:
        whole.update(gradients)
        shards = [{n: g.chunk(2)[r] for n, g in gradients.items()} for r in range(2)]
        # each rank's all-reduce returns the sum of both ranks' packed sums
        for rank, statistics in enumerate(halves):
            other = GradientStatistics()
            packed: list[torch.Tensor] = []
            other.all_reduce = lambda t, packed=packed: packed.append(t.clone()) or t
            other.update(shards[1 - rank])  # records the other rank's packed sums
            statistics.all_reduce = lambda t, packed=packed: t + packed[0]
            statistics.update(shards[rank])
    for statistics in halves:
        for name in ("w", "b"):
            assert torch.allclose(statistics.variance(name), whole.variance(name), rtol=1e-12)
            assert statistics.last_sq_norm(name) == pytest.approx(whole.last_sq_norm(name))


def test_split_param_groups_scales_learning_rates_and_keeps_the_scheduler_in_step() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    decay, rest = [model[0].weight, model[1].weight], [model[0].bias, model[1].bias]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1.0
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    scale = {id(model[0].weight): 0.5, id(model[0].bias): 0.5}
    split_param_groups(optimizer, lambda p: scale.get(id(p), 1.0), [scheduler])
    groups = [(g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups]
    assert groups == [(0.5, 0.1, 1), (1.0, 0.1, 1), (0.5, 0.0, 1), (1.0, 0.0, 1)]
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, 0.5, 0.25, 0.5]


def test_sensitivity_heatmap_puts_layers_in_rows_and_roles_in_columns() -> None:
    scores = {
        "enc.layer.0.q.weight": 1e-2, "enc.layer.1.q.weight": 1e-4, "enc.layer.1.v.weight": 1.0,
        "emb.weight": 0.0,
    }  # fmt: skip
    figure = sensitivity_heatmap(scores)
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["0", "1", "other"]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["q.weight", "v.weight", "emb.weight"]
    grid = axes.images[0].get_array()
    assert grid[0, 0] == pytest.approx(-2.0) and grid[1, 1] == pytest.approx(0.0)
    blank = np.ma.getmaskarray(grid)  # imshow masks the NaN cells
    assert blank[0, 1] and blank[2, 2] and not blank[0, 0]  # absent, or a zero score


def test_split_param_groups_reaches_inside_sequential_schedulers_and_refuses_one_cycle() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    chained = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[2])
    first = {id(p) for p in model[0].parameters()}
    split_param_groups(optimizer, lambda p: 0.1 if id(p) in first else 1.0, [chained])
    lrs = []
    for _ in range(5):
        optimizer.step()
        chained.step()
        lrs.append([g["lr"] for g in optimizer.param_groups])
    for low, high in lrs:  # every step, the first layer at a tenth of the second's rate
        assert low == pytest.approx(0.1 * high)
    assert lrs[1][1] == pytest.approx(1.0)  # warm-up done: the full rate
    other = torch.optim.SGD(model.parameters(), lr=1.0)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(other, max_lr=1.0, total_steps=10)
    with pytest.raises(ValueError, match="cannot split the groups of a OneCycleLR"):
        split_param_groups(other, lambda p: 0.5, [one_cycle])
    assert len(other.param_groups) == 1  # refused before anything changed


def test_unfrozen_parameters_go_back_in_their_original_order() -> None:
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(4)]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    drop_from_optimizer(optimizer, [params[0], params[2]])
    order = {id(p): i for i, p in enumerate(params)}
    add_to_optimizer(optimizer, [(params[2], 0), (params[0], 0)], lambda p: order[id(p)])
    assert [order[id(p)] for p in optimizer.param_groups[0]["params"]] == [0, 1, 2, 3]
