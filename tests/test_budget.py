"""The budget solver: step and run costs against hand-worked numbers, export sizes, the accuracy
model, the search on synthetic models whose optimum is known by construction, calibration
files, and the timing probe on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_3d import plan
from lightning_3d.budget import (
    AXES,
    DEFAULT_CURVES,
    DEFAULT_QAT_FACTOR,
    DEFAULT_WEIGHT_GRAD_SHARE,
    OFF,
    AccuracyCurves,
    BudgetAllocation,
    CostModel,
    PaddedStepFit,
    measure_cost_model,
    reachable_trainable,
    size_fraction,
    solve_budget,
)

# f = 1, b = 2, o = 1 s per step: the reference run of 100 steps takes 100 * 4 = 400 s.
COST = CostModel(
    forward_s=1.0,
    backward_s=2.0,
    optimizer_s=1.0,
    weight_grad_share=0.5,
    qat_factor=2.0,
    sparsity_overhead_s=0.1,
    teacher_forward_s=0.5,
)
PLAIN = CostModel(forward_s=1.0, backward_s=2.0, optimizer_s=1.0, qat_factor=2.0)
RECIPE: dict[str, Any] = {"reference_steps": 100, "epochs": 2}


def grid(**axes: list[Any]) -> dict[str, list[Any]]:
    """A candidate grid with the named axes and every other axis off."""
    return {axis: axes.get(axis, [OFF[axis]]) for axis in AXES}


# -- step and run costs -------------------------------------------------------------------------


def test_step_seconds_formula() -> None:
    assert COST.step_seconds() == pytest.approx(1 + 2 + 1)
    # f + b * (1 - w * (1 - t)) + o * t = 1 + 2 * 0.75 + 0.5
    assert COST.step_seconds(trainable=0.5) == pytest.approx(3.0)
    # q * (f + b * 0.75) + o * t = 2 * 2.5 + 0.5
    assert COST.step_seconds(trainable=0.5, qat=True) == pytest.approx(5.5)
    assert COST.step_seconds(trainable=0.5, pruning=True) == pytest.approx(3.1)
    # 2 * (1 + 2 * (1 - 0.5 * 0.75)) + 0.25 + 0.1
    assert COST.step_seconds(0.25, qat=True, pruning=True) == pytest.approx(4.85)
    with pytest.raises(ValueError, match="trainable"):
        COST.step_seconds(trainable=0.0)


def test_run_seconds_every_phase_by_hand() -> None:
    run = COST.run_seconds(
        **RECIPE,
        data_budget=0.6,
        trainable=0.5,
        sparsity=0.3,
        weight_bits=8,
        distill=0.5,
        steps=0.9,
    )
    # 50 steps per epoch: epoch 0 all data (50), epoch 1 at 0.6 (30) -> 80 < the 90-step cap.
    # Warm-up 0.25 * 80 = 20 dense steps, 60 with half the parameters; QAT from 0.8 * 80 = 64
    # (16 steps, all after warm-up); the teacher runs on min(50, 60) = 50 distinct batches.
    assert run.step_counts == pytest.approx(
        {"steps": 80, "warmup": 20, "frozen": 60, "qat": 16, "teacher_batches": 50}
    )
    assert run.breakdown == pytest.approx(
        {
            "forward": 80 * 1.0,
            "backward": 20 * 2.0 + 60 * 1.5,
            "optimizer": 20 * 1.0 + 60 * 0.5,
            "qat": (2.0 - 1.0) * (1.0 + 1.5) * 16,
            "masks": 0.1 * 60,  # from the end of the warm-up
            "teacher": 0.5 * 50,
        }
    )
    assert run.total_s == pytest.approx(331.0)
    # scaled to a real run's step period, every part and so every run scales alike
    real = COST.scaled_to(1.5 * COST.step_seconds())
    assert real.step_seconds() == pytest.approx(1.5 * COST.step_seconds())
    assert real.run_seconds(**RECIPE, trainable=0.5, weight_bits=8).total_s == pytest.approx(
        1.5 * COST.run_seconds(**RECIPE, trainable=0.5, weight_bits=8).total_s
    )
    with pytest.raises(ValueError, match="real_step_s must be > 0"):
        COST.scaled_to(0.0)


def test_run_seconds_steps_cap_and_qat_inside_warmup() -> None:
    run = PLAIN.run_seconds(
        **RECIPE, trainable=0.5, weight_bits=4, steps=0.5, warmup=0.9, qat_start=0.8
    )
    # No data budget: 100 scheduled steps, capped at 50. Warm-up 45 steps, 5 frozen; QAT from
    # step 40: 5 steps in warm-up (f + b = 3 s each) and 5 after (f + 1.5 = 2.5 s each).
    assert run.step_counts["steps"] == pytest.approx(50)
    assert run.breakdown["qat"] == pytest.approx(5 * 3.0 + 5 * 2.5)
    assert run.breakdown["masks"] == 0 and run.breakdown["teacher"] == 0
    assert run.total_s == pytest.approx(50 + (45 * 2 + 5 * 1.5) + (45 + 5 * 0.5) + 27.5)


def test_grouped_batches_price_forward_backward_qat_and_teacher_at_their_tokens() -> None:
    strengths = {"data_budget": 0.6, "trainable": 0.5, "sparsity": 0.3, "weight_bits": 8}
    full = COST.run_seconds(**RECIPE, **strengths, distill=0.5, steps=0.9)
    grouped = COST.run_seconds(**RECIPE, **strengths, distill=0.5, steps=0.9, token_share=0.5)
    # the hand-worked run above with each batch computing half the tokens: the forward,
    # backward, fake-quantization and teacher seconds halve, the optimizer and masks do not
    assert grouped.breakdown == pytest.approx(
        {
            "forward": 80 * 1.0 * 0.5,
            "backward": (20 * 2.0 + 60 * 1.5) * 0.5,
            "optimizer": 20 * 1.0 + 60 * 0.5,
            "qat": (2.0 - 1.0) * (1.0 + 1.5) * 16 * 0.5,
            "masks": 0.1 * 60,
            "teacher": 0.5 * 50 * 0.5,
        }
    )
    assert grouped.step_counts == full.step_counts
    assert grouped.total_s == pytest.approx(331.0 - (80 + 130 + 40 + 25) / 2)


def test_token_share_of_a_measured_step_ratio_prices_the_grouped_step_at_that_ratio() -> None:
    # f = 1, b = 2, o = 1 (a 4 s step): grouped steps measured at 0.625 of random ones' (2.5 s)
    # leave 1.5 s for forward and backward, half of their 3 s
    share = PLAIN.token_share_of(0.625)
    assert share == pytest.approx(0.5)
    run = PLAIN.run_seconds(reference_steps=10, epochs=1, token_share=share)
    assert run.total_s == pytest.approx(
        0.625 * PLAIN.run_seconds(reference_steps=10, epochs=1).total_s
    )
    assert PLAIN.token_share_of(1.0) == 1.0
    for ratio in (0.0, 1.2, float("nan")):
        with pytest.raises(ValueError, match="step_ratio must be in"):
            PLAIN.token_share_of(ratio)
    # the optimizer alone is 1 s of 4: a grouped step cannot take 0.2 of a random one
    with pytest.raises(ValueError, match="below the optimizer update's share of a step"):
        PLAIN.token_share_of(0.2)


def test_padded_step_fit_recovers_a_known_step_cost_from_two_runs() -> None:
    # steps cost 0.2 + 0.01 L s, and 0.3 s more the first time a run meets a length
    def timed(lengths: list[int]) -> list[tuple[int, float]]:
        met: set[int] = set()
        steps = []
        for length in lengths:
            steps.append((length, 0.2 + 0.01 * length + (0.0 if length in met else 0.3)))
            met.add(length)
        return steps

    random = [60, 64, 64, 62, 60, 64, 62, 60, 64, 64]  # few lengths, near the longest item
    grouped = [12, 40, 25, 12, 64, 40, 25, 33, 12, 40, 25, 64, 33]
    # the first 2 steps of each run are left out of the fit; their lengths still count as met
    fit = PaddedStepFit.fit([timed([99, 98, *random]), timed([99, 98, *grouped])], skip=2)
    assert fit.intercept_s == pytest.approx(0.2)
    assert fit.per_length_s == pytest.approx(0.01)
    assert fit.first_shape_s == pytest.approx(0.3)
    # a run is priced by its lengths: the grouped run pays 5 first steps, the random one 3
    assert fit.run_seconds(grouped) == pytest.approx(sum(t for _, t in timed(grouped)))
    assert fit.step_ratio(grouped, random) == pytest.approx(
        (sum(t for _, t in timed(grouped)) / 13) / (sum(t for _, t in timed(random)) / 10)
    )
    with pytest.raises(ValueError, match="at least two lengths met twice"):
        PaddedStepFit.fit([timed([10, 20, 30, 10])], skip=0)
    with pytest.raises(ValueError, match="padded length > 0"):
        PaddedStepFit.fit([[(10, 1.0), (0, 1.0)]], skip=0)
    with pytest.raises(ValueError, match="skip must be >= 0"):
        PaddedStepFit.fit([timed(random)], skip=-1)
    with pytest.raises(ValueError, match="padded lengths of both runs' batches"):
        fit.step_ratio([], random)


def test_grouping_buys_steps_within_the_same_time_budget() -> None:
    # f = 1, b = 2, o = 1: a plain step costs 4 s, a step at 0.5 of the tokens 2.5 s, so half
    # the reference time (200 s of 400) buys 80 such steps: the grid's 0.8 fits, 1.0 does not
    curves = AccuracyCurves({"steps": {0.5: -2.0, 0.8: -0.5}})
    candidates = grid(steps=[0.5, 0.8, 1.0])
    kwargs = {"reference_steps": 100, "epochs": 1, "compressible_share": 0.5}
    plain = solve_budget(0.5, None, PLAIN, curves, **kwargs, candidates=candidates)
    grouped = solve_budget(
        0.5, None, PLAIN, curves, **kwargs, candidates=candidates, token_share=0.5
    )
    assert plain.steps == 0.5 and plain.time_s == pytest.approx(200)
    assert grouped.steps == 0.8 and grouped.time_s == pytest.approx(80 * 2.5)
    assert grouped.token_share == 0.5 and "batches grouped by length" in grouped.reason


def test_run_seconds_is_the_sum_of_its_steps() -> None:
    run = COST.run_seconds(**RECIPE, data_budget=0.6, trainable=0.25, sparsity=0.2, weight_bits=4)
    # 80 steps: dense before step 20 (no masks yet), fake-quantized from step 64.
    total = sum(
        COST.step_seconds(trainable=0.25 if i >= 20 else 1.0, qat=i >= 64, pruning=i >= 20)
        for i in range(80)
    )
    assert run.total_s == pytest.approx(total)


@pytest.mark.parametrize("epochs", [1, 2, 4])
def test_reference_run(epochs: int) -> None:
    reference = COST.run_seconds(reference_steps=100, epochs=epochs)
    assert reference.total_s == pytest.approx(400.0) == COST.reference_seconds(100)
    # one epoch: the data budget only applies from epoch 1 on, so it changes nothing
    if epochs == 1:
        assert COST.run_seconds(reference_steps=100, epochs=1, data_budget=0.5).total_s == 400.0


@pytest.mark.parametrize(
    "arguments",
    [
        {"reference_steps": 0, "epochs": 1},
        {"reference_steps": 10, "epochs": 20},
        {"reference_steps": 10, "epochs": 2, "warmup": 1.0},
        {"reference_steps": 10, "epochs": 2, "qat_start": -0.1},
        {"reference_steps": 10, "epochs": 2, "weight_bits": 16},
        {"reference_steps": 10, "epochs": 2, "sparsity": 0.99},
        {"reference_steps": 10, "epochs": 2, "steps": 0.0},
        {"reference_steps": 10, "epochs": 2, "kept_share": 0.0},
        {"reference_steps": 10, "epochs": 2, "kept_share": 1.5},
        {"reference_steps": 10, "epochs": 2, "token_share": 0.0},
        {"reference_steps": 10, "epochs": 2, "token_share": 1.01},
    ],
)
def test_run_seconds_refuses_bad_arguments(arguments: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        COST.run_seconds(**arguments)


def test_cost_model_refuses_bad_coefficients() -> None:
    with pytest.raises(ValueError, match="forward_s"):
        CostModel(forward_s=-1.0, backward_s=1.0, optimizer_s=1.0)
    with pytest.raises(ValueError, match="weight_grad_share"):
        CostModel(forward_s=1.0, backward_s=1.0, optimizer_s=1.0, weight_grad_share=1.5)
    with pytest.raises(ValueError, match="qat_factor"):
        CostModel(forward_s=1.0, backward_s=1.0, optimizer_s=1.0, qat_factor=0.0)


def test_from_measurements_fits_weight_grad_share_and_qat_factor() -> None:
    # b = 2, with 20% trainable the backward takes 1.2: w = (2 - 1.2) / (2 * 0.8) = 0.5
    cost = CostModel.from_measurements(
        forward_s=1.0,
        backward_s=2.0,
        optimizer_s=0.5,
        frozen_backward_s=1.2,
        frozen_trainable=0.2,
        forward_backward_s=3.2,
        qat_forward_backward_s=4.8,
        sparsity_overhead_s=0.01,
    )
    assert cost.weight_grad_share == pytest.approx(0.5)
    assert cost.qat_factor == pytest.approx(1.5)  # 4.8 / 3.2
    assert cost.teacher_s == 1.0  # the forward, when not measured
    unmeasured = CostModel.from_measurements(forward_s=1.0, backward_s=2.0, optimizer_s=0.5)
    assert unmeasured.weight_grad_share == DEFAULT_WEIGHT_GRAD_SHARE
    assert unmeasured.qat_factor == DEFAULT_QAT_FACTOR
    noisy = CostModel.from_measurements(
        forward_s=1.0, backward_s=2.0, optimizer_s=0.5, frozen_backward_s=2.1, frozen_trainable=0.1
    )
    assert noisy.weight_grad_share == 0.0  # clipped into [0, 1]
    with pytest.raises(ValueError, match="go together"):
        CostModel.from_measurements(
            forward_s=1.0, backward_s=2.0, optimizer_s=0.5, frozen_backward_s=1.0
        )


# -- size -------------------------------------------------------------------------------------


def test_size_fraction_by_hand() -> None:
    assert size_fraction(0.0, None, "heads+neurons", 0.6) == 1.0
    assert size_fraction(0.5, None, "heads+neurons", 0.6) == pytest.approx(1 - 0.6 * 0.5)
    assert size_fraction(0.5, None, "unstructured", 0.6) == 1.0  # a dense export keeps zeros
    assert size_fraction(0.3, 8, "heads+neurons", 0.6) == pytest.approx((1 - 0.18) / 4)
    assert size_fraction(0.5, 4, "unstructured", 0.6) == pytest.approx(1 / 8)
    assert size_fraction(0.5, 4, "heads+neurons", 1.0) == pytest.approx(0.5 / 8)
    # a quantized export's overhead (graph, scales, float vectors) adds to its weights only
    assert size_fraction(0.3, 8, "heads+neurons", 0.6, 0.01) == pytest.approx(0.82 / 4 + 0.01)
    assert size_fraction(0.3, None, "heads+neurons", 0.6, 0.01) == pytest.approx(0.82)
    with pytest.raises(ValueError, match="quantized_overhead must be in"):
        size_fraction(0.3, 8, "heads+neurons", 0.6, 1.0)
    for bad in (
        (0.5, 16, "heads+neurons", 0.6),
        (0.5, None, "rows", 0.6),
        (0.5, None, "unstructured", 1.2),
        (1.0, None, "unstructured", 0.5),
    ):
        with pytest.raises(ValueError):
            size_fraction(*bad)


# -- accuracy ---------------------------------------------------------------------------------


def test_curves_interpolate_and_never_extrapolate() -> None:
    curves = AccuracyCurves(
        {"data_budget": {0.8: -1.0, 0.4: -5.0}, "weight_bits": {8: -0.5}}, base=80.0
    )
    assert curves.axis_change("data_budget", 1.0) == 0.0
    assert curves.axis_change("data_budget", 0.9) == pytest.approx(-0.5)
    assert curves.axis_change("data_budget", 0.6) == pytest.approx(-3.0)
    assert curves.axis_change("weight_bits", 8) == -0.5
    assert curves.axis_change("weight_bits", None) == 0.0
    assert curves.covers("data_budget", 0.4) and not curves.covers("data_budget", 0.3)
    assert not curves.covers("weight_bits", 4) and not curves.covers("sparsity", 0.1)
    with pytest.raises(ValueError, match="outside the measured points"):
        curves.axis_change("data_budget", 0.3)
    with pytest.raises(ValueError, match="outside the measured points"):
        curves.change(weight_bits=4)
    # additivity: the sum of the single-axis changes
    assert curves.change(data_budget=0.6, weight_bits=8) == pytest.approx(-3.5)
    assert curves.predict(data_budget=0.6, weight_bits=8) == pytest.approx(76.5)
    with pytest.raises(ValueError, match="no base"):
        AccuracyCurves({}).predict()


def test_curves_refuse_bad_points() -> None:
    with pytest.raises(ValueError, match="unknown axes"):
        AccuracyCurves({"memory": {0.5: -1.0}})
    with pytest.raises(ValueError, match="change is 0 by definition"):
        AccuracyCurves({"sparsity": {0.0: -1.0}})
    with pytest.raises(ValueError, match="two points"):
        AccuracyCurves({"sparsity": [[0.5, -1.0], [0.5, -2.0]]})
    with pytest.raises(ValueError, match="sparsity"):
        AccuracyCurves({"sparsity": {1.5: -1.0}})


def test_distillation_only_recovers_compression_losses() -> None:
    points = {"sparsity": {0.3: -0.6}, "distill": {0.5: 0.4, 0.9: 1.0}}
    curves = AccuracyCurves(points)
    assert curves.change(distill=0.5) == 0.0  # nothing to recover
    assert curves.change(sparsity=0.3, distill=0.5) == pytest.approx(-0.2)
    assert curves.change(sparsity=0.3, distill=0.9) == pytest.approx(0.0)  # capped at 0.6
    plain = AccuracyCurves(points, distill_recovers_compression=False)
    assert plain.change(distill=0.5) == pytest.approx(0.4)
    assert plain.change(sparsity=0.3, distill=0.9) == pytest.approx(0.4)


def test_pruning_is_priced_at_the_run_length() -> None:
    curves = AccuracyCurves(
        {"sparsity": {0.2: -0.3, 0.4: -1.0}, "steps": {0.5: -1.0}},
        sparsity_by_steps={0.5: {0.2: -2.3, 0.4: -4.0}},
    )
    # at the measured lengths: each length's own curve (0.3 lies halfway between 0.2 and 0.4)
    assert curves.sparsity_change(0.3, steps=1.0) == pytest.approx(-0.65)
    assert curves.sparsity_change(0.3, steps=0.5) == pytest.approx(-3.15)
    # between them: linear in the run's length, halfway at 0.75
    assert curves.sparsity_change(0.3, steps=0.75) == pytest.approx((-0.65 - 3.15) / 2)
    assert curves.change(sparsity=0.3, steps=0.75) == pytest.approx(-1.9 - 0.5)
    assert curves.sparsity_change(0.0, steps=0.5) == 0.0  # no pruning, nothing to recover
    # shorter than every measured length: not covered, never extrapolated
    assert curves.covers_run(sparsity=0.2, steps=0.5) and curves.covers_run(steps=0.5)
    assert not curves.covers_run(sparsity=0.2, steps=0.45)
    with pytest.raises(ValueError, match="do not extrapolate to shorter ones"):
        curves.sparsity_change(0.2, steps=0.45)
    # a length's curve must cover the sparsity too
    assert not AccuracyCurves(
        {"sparsity": {0.4: -1.0}}, sparsity_by_steps={0.5: {0.2: -2.3}}
    ).covers_run(sparsity=0.4, steps=0.5)
    with pytest.raises(ValueError, match=r"a run length must be in \(0, 1\)"):
        AccuracyCurves({}, sparsity_by_steps={1.0: {0.2: -1.0}})
    # without length curves pruning costs the same in every run (the earlier rule)
    assert AccuracyCurves({"sparsity": {0.2: -0.3}}).sparsity_change(0.2, steps=0.5) == -0.3


def test_solver_prices_pruning_in_a_short_run() -> None:
    # Time 0.6 and size 0.9 (half of the weights prunable) need half the steps and either
    # pruning 20% of the heads and neurons (size 0.9) or int8 at export (0.25 + 0): pruning
    # costs 0.3 points in a full run but 2.3 in a half one.
    points = {"sparsity": {0.2: -0.3}, "weight_bits": {8: -2.0}, "steps": {0.5: -1.0}}
    candidates = grid(sparsity=[0.0, 0.2], weight_bits=[None, 8], steps=[1.0, 0.5])
    arguments: dict[str, Any] = {
        "compressible_share": 0.5,
        "candidates": candidates,
        "quantize_at": "export",
        **RECIPE,
    }
    blind = solve_budget(0.6, 0.9, PLAIN, AccuracyCurves(points), **arguments)
    assert blind.strengths == {**OFF, "sparsity": 0.2, "steps": 0.5}
    assert blind.accuracy_change == pytest.approx(-1.3)
    informed = solve_budget(
        0.6, 0.9, PLAIN, AccuracyCurves(points, sparsity_by_steps={0.5: {0.2: -2.3}}),
        **arguments,
    )  # fmt: skip
    assert informed.strengths == {**OFF, "weight_bits": 8, "steps": 0.5}
    assert informed.accuracy_change == pytest.approx(-3.0)
    assert "pruning priced at the run's length (sparsity curves measured at steps 0.5" in (
        informed.reason
    )


def test_default_curves_are_a_conservative_prior() -> None:
    for axis in ("data_budget", "trainable", "sparsity", "steps"):
        pairs = DEFAULT_CURVES.points[axis]
        for value in [s for s, _ in pairs if s != OFF[axis]]:
            assert DEFAULT_CURVES.axis_change(axis, value) < 0, (axis, value)
    assert DEFAULT_CURVES.change(weight_bits=4) < DEFAULT_CURVES.change(weight_bits=8) < 0
    assert DEFAULT_CURVES.change(distill=0.9) == 0.0
    assert DEFAULT_CURVES.change(weight_bits=8, distill=0.9) > DEFAULT_CURVES.change(weight_bits=8)
    for axis, values in {
        "data_budget": (1.0, 0.8, 0.6, 0.5),
        "trainable": (1.0, 0.75, 0.5, 0.25),
        "sparsity": (0.0, 0.2, 0.3, 0.4, 0.5),
        "steps": (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4),
    }.items():
        assert all(DEFAULT_CURVES.covers(axis, value) for value in values)


def test_from_ablation_summary() -> None:
    setups: dict[str, dict[str, list[float]]] = {
        "Standard": {"test_acc": [0.80, 0.82]},
        "DataOpt": {"test_acc": [0.75]},
        "ParamOpt": {"test_acc": [0.79]},
        "ModelOpt": {"test_acc": [0.77]},
        "ModelOpt+KD": {"test_acc": [0.78]},
        "3D": {"test_acc": [0.60]},
    }
    summary: dict[str, Any] = {
        "setups": setups,
        "strengths": {
            "Standard": {},
            "DataOpt": {"data_budget": 0.4},
            "ParamOpt": {"trainable": 0.1},
            "ModelOpt": {"sparsity": 0.5, "weight_bits": 4},
            "ModelOpt+KD": {"sparsity": 0.5, "weight_bits": 4, "distill": 0.5},
            "3D": {"data_budget": 0.4, "trainable": 0.1, "sparsity": 0.5, "weight_bits": 4},
        },
    }
    curves = AccuracyCurves.from_ablation_summary(summary)
    assert curves.base == pytest.approx(81.0)
    assert curves.axis_change("data_budget", 0.4) == pytest.approx(-6.0)
    assert curves.axis_change("trainable", 0.1) == pytest.approx(-2.0)
    assert curves.axis_change("distill", 0.5) == pytest.approx(1.0)  # against ModelOpt
    # the two-axis ModelOpt and the 3D combination are not single-axis points
    assert not curves.covers("sparsity", 0.5) and not curves.covers("weight_bits", 4)

    percent = {
        "unit": "percent",
        "setups": {k: {"test_acc": [100 * a for a in v["test_acc"]]} for k, v in setups.items()},
        "strengths": summary["strengths"],
    }
    in_percent = AccuracyCurves.from_ablation_summary(percent)
    assert in_percent.base == pytest.approx(81.0)
    assert in_percent.axis_change("data_budget", 0.4) == pytest.approx(-6.0)

    missing = {"setups": summary["setups"], "strengths": {"Standard": {}}}
    with pytest.raises(ValueError, match="no strengths"):
        AccuracyCurves.from_ablation_summary(missing)
    no_baseline = {
        "setups": {"DataOpt": {"test_acc": [0.75]}},
        "strengths": {"DataOpt": {"data_budget": 0.4}},
    }
    with pytest.raises(ValueError, match="baseline"):
        AccuracyCurves.from_ablation_summary(no_baseline)


def test_from_ablation_summary_reads_pruning_in_a_short_run() -> None:
    summary = {
        "unit": "percent",
        "setups": {
            "Standard": {"test_acc": [84.0, 85.0]},
            "Standard-half": {"test_acc": [83.0]},
            "ModelOpt": {"test_acc": [84.0]},
            "ModelOpt-half": {"test_acc": [80.0, 80.5]},
        },
        "strengths": {
            "Standard": {},
            "Standard-half": {"steps": 0.5},
            "ModelOpt": {"sparsity": 0.2},
            "ModelOpt-half": {"sparsity": 0.2, "steps": 0.5},
        },
    }
    curves = AccuracyCurves.from_ablation_summary(summary)
    assert curves.axis_change("sparsity", 0.2) == pytest.approx(-0.5)  # against Standard
    assert curves.axis_change("steps", 0.5) == pytest.approx(-1.5)
    # the short pruned run against the short unpruned one: 80.25 - 83
    assert dict(curves.sparsity_by_steps[0.5])[0.2] == pytest.approx(-2.75)
    assert curves.change(sparsity=0.2, steps=0.5) == pytest.approx(-4.25)
    # without the same-length unpruned run there is nothing to read it against
    del summary["setups"]["Standard-half"], summary["strengths"]["Standard-half"]
    assert AccuracyCurves.from_ablation_summary(summary).sparsity_by_steps == {}


# -- the solver -------------------------------------------------------------------------------


def test_solver_only_freezing_meets_the_time() -> None:
    # w = 1 and no warm-up: freezing half the parameters halves backward and optimizer.
    cost = CostModel(forward_s=1.0, backward_s=2.0, optimizer_s=1.0, weight_grad_share=1.0)
    curves = AccuracyCurves(
        {"data_budget": {0.5: -0.5}, "trainable": {0.5: -1.0}, "steps": {0.5: -3.0}}
    )
    candidates = grid(data_budget=[1.0, 0.5], trainable=[1.0, 0.5], steps=[1.0, 0.5])
    # By hand (reference 400 s):
    #   data_budget 0.5: 75 steps * 4 s = 300 s -> 0.75, -0.5 points
    #   trainable 0.5:  100 steps * (1 + 1 + 0.5) = 250 s -> 0.625, -1.0
    #   steps 0.5:       50 * 4 = 200 s -> 0.5, -3.0
    #   data + trainable: 75 * 2.5 = 187.5 s -> 0.469, -1.5
    # Within 0.7 the most accurate is freezing alone: the data budget alone takes 0.75.
    allocation = solve_budget(
        0.7,
        None,
        cost,
        curves,
        **RECIPE,
        compressible_share=0.5,
        candidates=candidates,
        warmup=0.0,
    )
    assert allocation.strengths == {**OFF, "trainable": 0.5}
    assert allocation.time_fraction == pytest.approx(0.625)
    assert allocation.time_s == pytest.approx(250.0)
    assert allocation.reference_time_s == pytest.approx(400.0)
    assert allocation.accuracy_change == pytest.approx(-1.0)
    assert allocation.accuracy is None
    assert allocation.binding == ("time",)
    assert sum(allocation.breakdown.values()) == pytest.approx(250.0)
    assert "trainable=0.5: saves 150 s, costs 1 points" in allocation.reason
    assert "0.00667 points per second saved" in allocation.reason
    # with a little more time the data budget alone fits, and loses less
    looser = solve_budget(
        0.8,
        None,
        cost,
        curves,
        **RECIPE,
        compressible_share=0.5,
        candidates=candidates,
        warmup=0.0,
    )
    assert looser.strengths == {**OFF, "data_budget": 0.5}


def test_solver_predicts_the_trainable_share_whole_tensors_reach() -> None:
    """A freezer keeps whole tensors: with a 50% tensor among the freezable ones, asking for
    75% trainable freezes it and reaches 50%, and the solver must price that, not 75%."""
    cost = CostModel(forward_s=1.0, backward_s=2.0, optimizer_s=1.0, weight_grad_share=1.0)
    curves = AccuracyCurves({"trainable": {0.75: -0.2, 0.5: -1.0}, "steps": {0.8: -0.5}})
    candidates = grid(trainable=[1.0, 0.75], steps=[1.0, 0.8])
    units = [0.5, 0.05]  # 45% always trains
    assert reachable_trainable(0.75, units) == pytest.approx(0.5)
    # By hand (w = 1: a step takes 1 + 3 t s; reference 100 * 4 = 400 s):
    #   trainable 0.75 taken at its word: 325 s -> 0.8125, -0.2 points
    #   trainable 0.75 reaching 0.5:      250 s -> 0.625,  -1.0
    #   steps 0.8:                        320 s -> 0.8,    -0.5
    #   both, reaching 0.5:        80 * 2.5 = 200 s -> 0.5, -1.5
    solve = {"compressible_share": 0.5, "candidates": candidates, "warmup": 0.0, **RECIPE}
    nominal = solve_budget(0.82, None, cost, curves, **solve)
    assert nominal.strengths == {**OFF, "trainable": 0.75}
    assert nominal.trainable_reached is None
    reached = solve_budget(0.82, None, cost, curves, freezable_units=units, **solve)
    assert reached.strengths == {**OFF, "steps": 0.8}
    assert reached.accuracy_change == pytest.approx(-0.5)
    # within 0.7 only the freezer fits: priced at the 50% it reaches
    tight = solve_budget(0.7, None, cost, curves, freezable_units=units, **solve)
    assert tight.strengths == {**OFF, "trainable": 0.75}
    assert tight.trainable_reached == pytest.approx(0.5)
    assert tight.time_s == pytest.approx(250.0)
    assert tight.accuracy_change == pytest.approx(-1.0)
    assert "trainable=0.75 (the freezer reaches 0.5 with whole tensors): saves 150 s" in (
        tight.reason
    )
    # a share the freezer lands on outside the curves' points is not tried
    coarse = [0.55]  # 0.75 reaches 0.45, below the measured 0.5
    assert reachable_trainable(0.75, coarse) == pytest.approx(0.45)
    with pytest.raises(ValueError, match=r"time=0\.7 cannot be met"):
        solve_budget(0.7, None, cost, curves, freezable_units=coarse, **solve)


def test_reachable_trainable_refuses_what_always_trains() -> None:
    with pytest.raises(ValueError, match=r"trainable=0.3 is below the share that always trains"):
        reachable_trainable(0.3, [0.5, 0.1])


def test_solver_size_budget_forces_int8() -> None:
    curves = AccuracyCurves(
        {
            "sparsity": {0.3: -0.6, 0.5: -1.6},
            "weight_bits": {8: -0.5, 4: -2.0},
            "steps": {0.9: -0.2},
        },
        base=80.0,
    )
    candidates = grid(sparsity=[0.0, 0.3, 0.5], weight_bits=[None, 8, 4], steps=[1.0, 0.9])
    # Size 0.3 with 60% of the parameters prunable: float is at best 1 - 0.6 * 0.5 = 0.7, so
    # quantization is needed, and int8 (1/4 of the bytes) loses least. Its QAT over the last 20
    # steps costs (2 - 1) * 3 s each: 460 s -> 1.15 of the reference run.
    allocation = solve_budget(
        2.0, 0.3, PLAIN, curves, **RECIPE, compressible_share=0.6, candidates=candidates
    )
    assert allocation.strengths == {**OFF, "weight_bits": 8}
    assert allocation.size_fraction == pytest.approx(0.25)
    assert allocation.time_fraction == pytest.approx(1.15)
    assert allocation.accuracy == pytest.approx(79.5)
    assert allocation.breakdown["qat"] == pytest.approx(60.0)
    assert allocation.binding == ("size",)
    assert "shrinks the export from 1 to 0.25 of fp32 dense" in allocation.reason
    # With time 1.1 int8 needs a shorter run: 90 steps * 4 s + 18 QAT steps * 3 s = 414 s,
    # 1.035, -0.7 points; without the size budget the float run (1.0) would be better.
    tighter = solve_budget(
        1.1, 0.3, PLAIN, curves, **RECIPE, compressible_share=0.6, candidates=candidates
    )
    assert tighter.strengths == {**OFF, "weight_bits": 8, "steps": 0.9}
    assert tighter.time_fraction == pytest.approx(414 / 400)
    assert tighter.accuracy_change == pytest.approx(-0.7)
    assert tighter.binding == ("time", "size")


def test_solver_quantizing_at_export_pays_no_training_time() -> None:
    curves = AccuracyCurves({"weight_bits": {8: -0.2}, "steps": {0.9: -0.2}}, base=80.0)
    candidates = grid(weight_bits=[None, 8], steps=[1.0, 0.9])
    # Quantized at export, int8 adds nothing to the run: 400 s, time 1.0, the size budget met
    # without the shorter run QAT needed above.
    allocation = solve_budget(
        1.1, 0.3, PLAIN, curves, **RECIPE, compressible_share=0.6, candidates=candidates,
        quantize_at="export",
    )  # fmt: skip
    assert allocation.strengths == {**OFF, "weight_bits": 8}
    assert allocation.time_fraction == pytest.approx(1.0)
    assert allocation.breakdown["qat"] == 0.0 and allocation.quantize_at == "export"
    assert allocation.accuracy == pytest.approx(79.8)
    run = PLAIN.run_seconds(**RECIPE, weight_bits=8, quantize_at="export")
    assert run.total_s == pytest.approx(400.0) and run.step_counts["qat"] == 0.0
    # int4 has no export path: left out of the default grid, refused when asked for
    default = solve_budget(0.9, None, PLAIN, DEFAULT_CURVES, **RECIPE, compressible_share=0.6,
                           quantize_at="export")  # fmt: skip
    assert default.weight_bits != 4
    with pytest.raises(ValueError, match="int8 only: leave 4 out of weight_bits"):
        solve_budget(1.1, None, PLAIN, DEFAULT_CURVES, **RECIPE, compressible_share=0.6,
                     candidates={"weight_bits": [None, 4]}, quantize_at="export")  # fmt: skip
    with pytest.raises(ValueError, match="quantize_at must be one of"):
        PLAIN.run_seconds(**RECIPE, quantize_at="never")


def test_solver_breaks_ties_by_lower_cost() -> None:
    # Freezing half the parameters is free by these curves; data and steps cost the same.
    curves = AccuracyCurves(
        {"data_budget": {0.5: -1.0}, "trainable": {0.5: 0.0}, "steps": {0.5: -1.0}}
    )
    candidates = grid(data_budget=[1.0, 0.5], trainable=[1.0, 0.5], steps=[1.0, 0.5])
    # Time 1: every axis off (1.0) and freezing (25 dense + 75 frozen steps: 100 + 50 + 112.5
    # + 25 + 37.5 = 325 s, 0.8125) both predict 0 points: the cheaper wins.
    free = solve_budget(
        1.0, None, PLAIN, curves, **RECIPE, compressible_share=0.5, candidates=candidates
    )
    assert free.strengths == {**OFF, "trainable": 0.5}
    assert free.time_fraction == pytest.approx(0.8125)
    assert free.binding == ()
    assert "no budget binds" in free.reason
    # Time 0.6: half the steps (200 s, 0.5) and half the steps with freezing (50 + 25 + 56.25
    # + 12.5 + 18.75 = 162.5 s, 0.406) both predict -1; the data budget at 0.5 alone takes
    # 0.75 and with freezing 0.609.
    tight = solve_budget(
        0.6, None, PLAIN, curves, **RECIPE, compressible_share=0.5, candidates=candidates
    )
    assert tight.strengths == {**OFF, "trainable": 0.5, "steps": 0.5}
    assert tight.time_fraction == pytest.approx(162.5 / 400)
    assert tight.accuracy_change == pytest.approx(-1.0)


def test_solver_with_the_prior_and_the_default_grid() -> None:
    unconstrained = solve_budget(1.0, None, COST, DEFAULT_CURVES, **RECIPE, compressible_share=0.6)
    assert unconstrained.strengths == OFF  # every compression costs accuracy in the prior
    assert unconstrained.accuracy_change == 0.0
    allocation = solve_budget(0.5, 0.3, COST, DEFAULT_CURVES, **RECIPE, compressible_share=0.6)
    assert allocation.time_fraction <= 0.5 and allocation.size_fraction <= 0.3
    assert allocation.weight_bits is not None
    assert set(allocation.binding) == {"time", "size"}
    arguments = allocation.plan_arguments()
    assert set(arguments) == {
        "data_budget",
        "trainable",
        "sparsity",
        "weight_bits",
        "distill",
        "steps_fraction",
    }
    assert arguments["steps_fraction"] == allocation.steps
    axes = {k: v for k, v in arguments.items() if k not in ("distill", "steps_fraction")}
    assert plan.ThreeDPlan(**axes).weight_bits == allocation.weight_bits
    # default strengths beyond the curves' points are left out, and said so
    short = AccuracyCurves({"sparsity": {0.3: -0.6}})
    limited = solve_budget(1.2, 0.9, COST, short, **RECIPE, compressible_share=0.6)
    # only sparsity can shrink the export: 1 - 0.6 * 0.2 = 0.88 (masks on the 75 steps after
    # the warm-up add 7.5 s: 1.01875)
    assert limited.strengths == {**OFF, "sparsity": 0.2}
    assert limited.time_fraction == pytest.approx(407.5 / 400)
    assert "sparsity=0.4, sparsity=0.5" in limited.reason
    assert "data_budget=0.8" in limited.reason  # no data_budget points: the axis stays off


def test_solver_names_the_budget_it_cannot_meet() -> None:
    with pytest.raises(ValueError, match=r"time=0\.05 cannot be met: the cheapest allocation"):
        solve_budget(0.05, None, COST, DEFAULT_CURVES, **RECIPE, compressible_share=0.6)
    with pytest.raises(ValueError, match=r"size=0\.01 cannot be met: the smallest allocation"):
        solve_budget(1.0, 0.01, COST, DEFAULT_CURVES, **RECIPE, compressible_share=0.6)
    curves = AccuracyCurves(
        {"sparsity": {0.5: -1.6}, "weight_bits": {8: -0.5, 4: -2.0}, "steps": {0.9: -0.2}}
    )
    candidates = grid(sparsity=[0.0, 0.5], weight_bits=[None, 8, 4], steps=[1.0, 0.9])
    # size 0.1 needs int4 and sparsity 0.5 (0.0875), whose QAT makes even 90 steps 1.035 > 1
    with pytest.raises(ValueError, match=r"time=1\.0 and size=0\.1 cannot be met together"):
        solve_budget(
            1.0, 0.1, PLAIN, curves, **RECIPE, compressible_share=0.6, candidates=candidates
        )


@pytest.mark.parametrize(
    ("time", "size", "extra", "message"),
    [
        (0.0, None, {}, "time"),
        (-1.0, None, {}, "time"),
        (math.nan, None, {}, "time"),
        (0.5, 0.0, {}, "size"),
        (0.5, 1.5, {}, "size"),
        (0.5, None, {"prune_pattern": "rows"}, "prune_pattern"),
        (0.5, None, {"compressible_share": 1.5}, "compressible_share"),
        (0.5, None, {"warmup": 1.0}, "warmup"),
        (0.5, None, {"candidates": {"memory": [1.0]}}, "unknown candidate axes"),
        (0.5, None, {"candidates": {"data_budget": [1.5]}}, "data_budget"),
        (0.5, None, {"candidates": {"sparsity": [0.95]}}, "outside the accuracy curves"),
        (0.5, None, {"candidates": {"weight_bits": []}}, "empty"),
    ],
)
def test_solver_refuses_bad_arguments(
    time: float, size: float | None, extra: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {**RECIPE, "compressible_share": 0.6, **extra}
    with pytest.raises(ValueError, match=message):
        solve_budget(time, size, COST, DEFAULT_CURVES, **arguments)


def test_budget_allocation_is_a_plain_record() -> None:
    allocation = solve_budget(0.9, None, COST, DEFAULT_CURVES, **RECIPE, compressible_share=0.6)
    assert isinstance(allocation, BudgetAllocation)
    with pytest.raises(AttributeError):
        allocation.trainable = 0.1  # type: ignore[misc]
    assert allocation.warmup == 0.25 and allocation.qat_start == 0.8
    assert allocation.prune_pattern == "heads+neurons"


# -- calibration files ------------------------------------------------------------------------


def test_cost_model_json_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "cost.json"
    COST.save(path)
    assert CostModel.load(path) == COST
    assert json.loads(path.read_text())["qat_factor"] == 2.0
    assert CostModel.from_dict(PLAIN.to_dict()) == PLAIN  # teacher_forward_s None survives
    with pytest.raises(ValueError, match="unknown CostModel keys"):
        CostModel.from_dict({**COST.to_dict(), "latency_s": 1.0})


def test_accuracy_curves_json_round_trip(tmp_path: Path) -> None:
    curves = AccuracyCurves(
        {"data_budget": {0.5: -1.25}, "weight_bits": {8: -0.5, 4: -2.0}, "distill": {0.9: 0.5}},
        base=81.0,
    )
    path = tmp_path / "curves.json"
    curves.save(path)
    loaded = AccuracyCurves.load(path)
    assert loaded == curves
    assert loaded.change(weight_bits=4, distill=0.9) == pytest.approx(-1.5)
    # a hand-written file with strengths as object keys reads the same
    path.write_text(json.dumps({"points": {"weight_bits": {"8": -0.5, "4": -2.0}}}))
    assert AccuracyCurves.load(path).axis_change("weight_bits", 4) == -2.0
    with pytest.raises(ValueError, match="unknown AccuracyCurves keys"):
        AccuracyCurves.from_dict({"points": {}, "scale": 1})
    assert AccuracyCurves.from_dict(DEFAULT_CURVES.to_dict()) == DEFAULT_CURVES
    by_length = AccuracyCurves({"sparsity": {0.2: -0.3}}, sparsity_by_steps={0.5: {0.2: -2.3}})
    by_length.save(path)
    assert AccuracyCurves.load(path) == by_length
    assert json.loads(path.read_text())["sparsity_by_steps"] == {"0.5": [[0.2, -2.3]]}


# -- measuring ----------------------------------------------------------------------------------


def test_measure_cost_model_restores_the_model() -> None:
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    batch = {"x": torch.randn(8, 16), "y": torch.randint(0, 4, (8,))}

    def loss_fn(module: nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(module(data["x"]), data["y"])

    model[0].bias.requires_grad_(False)
    kept_grad = torch.full_like(model[2].weight, 0.5)
    model[2].weight.grad = kept_grad
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    values = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()

    cost = measure_cost_model(model, batch, loss_fn, repeats=2, qat_preset="int8_weight_only")

    for coefficient in (
        cost.forward_s,
        cost.backward_s,
        cost.optimizer_s,
        cost.teacher_s,
        cost.sparsity_overhead_s,
        cost.qat_factor,
    ):
        assert coefficient > 0
    assert 0.0 <= cost.weight_grad_share <= 1.0
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model[2].weight.grad is kept_grad
    assert all(p.grad is None for n, p in model.named_parameters() if n != "2.weight")
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), values, strict=True))
    assert not any(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(hasattr(m, "weight_fake_quantizer") for m in model.modules())


def test_measure_cost_model_without_qat_keeps_the_default_factor() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    batch = {"x": torch.randn(4, 8), "y": torch.tensor([0, 1, 1, 0])}
    cost = measure_cost_model(
        model,
        batch,
        lambda m, b: nn.functional.cross_entropy(m(b["x"]), b["y"]),
        optimizer_factory=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        repeats=1,
    )
    assert cost.qat_factor == DEFAULT_QAT_FACTOR
    assert model.training  # the mode it was in
    with pytest.raises(ValueError, match="repeats"):
        measure_cost_model(model, batch, lambda m, b: m(b["x"]).sum(), repeats=0)
