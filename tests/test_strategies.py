"""CompressedFSDPStrategy, CompressedDDPStrategy and the compressed collectives.

The distributed tests launch ``tests/jobs/distributed_job.py`` on 2 CPU processes (gloo) the way
Lightning documents for manually launched jobs, once per module, and assert on what each rank
wrote.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_3d.collectives import (
    CommStats,
    CompressedAllGather,
    CompressedCommState,
    block_slot_nbytes,
    decode_block_slot,
    encode_block_slot,
    encode_slots,
    own_chunk,
    pack_nibbles,
    reduce_op_scale,
    slot_nbytes,
    unpack_nibbles,
)
from lightning_3d.compression import GradientCompressor
from lightning_3d.sharding import shard_targets, transformer_block_classes
from lightning_3d.strategies import CompressedDDPStrategy, CompressedFSDPStrategy

# The surviving rank must stop on its own long before this (it takes seconds); the bound only
# turns a hang into a failure.
DEATH_BOUND_S = 180


@pytest.fixture(scope="module")
def job(
    tmp_path_factory: pytest.TempPathFactory, launch_two_ranks: Any
) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("distributed")
    scenarios = "parity,resume,ddp,feedback,reduce_ops,own_sharding,frozen_replicated"
    for rank, result in enumerate(launch_two_ranks(scenarios, out, timeout=1500)):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stdout[-6000:]}"
    merged: list[dict[str, Any]] = [{}, {}]
    for rank in range(2):
        for name in scenarios.split(","):
            merged[rank].update(json.loads((out / f"{name}.rank{rank}.json").read_text()))
    return out, merged


# ------------------------------------------------------------------------------ distributed
def test_fsdp_trains_end_to_end(job):
    _, (rank0, rank1) = job
    assert len(rank0["losses_compressed"]) == 6
    assert all(math.isfinite(loss) for loss in rank0["losses_compressed"])
    assert rank1["losses_compressed"] != rank0["losses_compressed"]  # each rank its own batches


def test_dense_path_equals_fsdp2_reduce_scatter(job):
    _, (rank0, _) = job
    assert rank0["dense_vs_fsdp"] <= 1e-6
    assert rank0["losses_dense"] == pytest.approx(rank0["losses_fsdp"], abs=1e-6)


def test_reduce_ops_and_uneven_shards_match_fsdp2(job):
    # Linear(7, 5) and Linear(5, 3) on 2 ranks: every shard padded; each rank checks its own
    for rank in job[1]:
        assert rank["largest_gradient"] > 0.1
        assert rank["difference_avg"] == 0.0
        assert rank["difference_fp16_reduce"] == 0.0
        # PREMUL_SUM(1/3): gloo has no such op, so against the average times 2/3 (float rounding)
        assert rank["difference_divide_factor"] <= 1e-6
        # compressed (density 0.5): different from the average, and scaled by the factor exactly
        assert rank["compressed_vs_average"] > 1e-4
        assert rank["difference_divide_factor_compressed"] <= 1e-6


@pytest.mark.parametrize("ranks", [3, pytest.param(4, marks=pytest.mark.slow)])
def test_reduce_ops_uneven_and_empty_shards_on_more_ranks(ranks, launch_two_ranks, tmp_path):
    """The reduce-op checks on 3 and 4 ranks: Linear(7, 5) and Linear(5, 3) split 2/2/1 and
    2/2/1/0 rows (4 ranks: the last rank holds an empty shard of the second layer)."""
    results = launch_two_ranks("reduce_ops", tmp_path, 600, ranks=ranks)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stdout[-6000:]}"
    outputs = [
        json.loads((tmp_path / f"reduce_ops.rank{r}.json").read_text()) for r in range(ranks)
    ]
    rows = [len(c) for c in torch.arange(5).chunk(ranks)]
    assert [o["shard_rows"][0] for o in outputs] == rows + [0] * (ranks - len(rows))
    if ranks == 4:
        assert outputs[3]["shard_rows"][0] == outputs[3]["shard_rows"][2] == 0  # empty shards
    for rank, output in enumerate(outputs):
        # three or more addends: another summation order than gloo's ring, so not bit for bit
        fp16_rounding = ranks * 2**-10 * output["largest_gradient"]  # a few fp16 half-ulps
        assert output["difference_avg"] <= 1e-6
        assert output["difference_fp16_reduce"] <= fp16_rounding
        assert output["difference_divide_factor"] <= 1e-6
        if output["largest_gradient"]:  # a rank with rows: compression changed its sums
            assert output["compressed_vs_average"] > 1e-4
        assert output["difference_divide_factor_compressed"] <= 1e-6
        assert output["poisoned_all_nan"]
        # rank 1 flags, per unit, each chunk holding real rows (others send padding only): for
        # every rank with a shard of that unit, its own chunk included
        holding = sum(o["shard_rows"][0] > 0 for o in outputs)
        holding += sum(o["shard_rows"][2] > 0 for o in outputs)
        assert output["poisoned_nonfinite_messages"] == (holding if rank == 1 else 0)


@pytest.mark.parametrize(
    "ranks", [2, pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)]
)
def test_parameters_all_gathered_compressed(ranks, launch_two_ranks, tmp_path):
    """Every rank computes with the same decoded weights, equal to an independent expectation;
    the fp32 master shards stay exact; 4-bit differences track moved masters without
    accumulating error; fits compressed both ways train."""
    results = launch_two_ranks("all_gather", tmp_path, 900, ranks=ranks)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stdout[-6000:]}"
    outputs = [
        json.loads((tmp_path / f"all_gather.rank{r}.json").read_text()) for r in range(ranks)
    ]
    for output in outputs:
        # int4_delta's first gather is int8
        for value_format, block_bytes in (("bf16", 2.0), ("int8", 1.5), ("int4_delta", 1.5)):
            figures = output[value_format]
            assert figures["whole_vs_expected"] <= 1e-6 and figures["changed"]
            assert figures["uneven_error"] <= figures["uneven_bound"] / 2 + 1e-7
            assert figures["masters_exact"] and figures["spread"] == 0.0
            # per rank and gather: block_bytes per entry against 4 (padding rounds up)
            ratio = figures["dense_bytes"] / figures["wire_bytes"]
            assert 4 / block_bytes * 0.8 <= ratio <= 4 / block_bytes
        delta = output["int4_delta"]["delta"]
        assert delta["second_vs_expected"] <= 1e-6 and delta["spread"] == 0.0
        assert delta["masters_exact"]
        # the 4-bit difference lands closer to the moved weights than int8 of the weights did
        assert delta["second_error"] < delta["int8_error"]
        assert delta["refined_over_bound"] <= 1.0 + 1e-4
        # two gathers of 4-bit codes (half a byte) plus a scale per 8 entries: 1 byte of 4
        assert 4 * 0.8 <= delta["dense_bytes"] / delta["wire_bytes"] <= 4
        bf16 = output["int4_delta_bf16"]  # the copy kept in FSDP2's bf16 param_dtype
        assert bf16["dtype"] == "torch.bfloat16" and bf16["spread"] == 0.0
        assert bf16["second_error"] < bf16["first_error"]
        assert bf16["second_error"] <= bf16["bf16_step"]
        for value_format in ("int8", "int4_delta"):
            both = output[f"both_ways_{value_format}"]
            # int8: 1 byte of 4 per entry; int4_delta: the first gather int8, then half a byte
            low, high = (3.0, 4.0) if value_format == "int8" else (5.0, 8.0)
            assert both["steps"] == 6 and low <= both["all_gather_ratio"] <= high
            assert both["gradient_ratio"] > 8
            # the last step's figures, summed over ranks, in callback_metrics without a logger
            seen = both["callback_metrics"]
            assert seen["comm/all_gather_wire_bytes"] > 0 and seen["comm/wire_bytes"] > 0
            assert 3.0 <= seen["comm/compression_ratio"] <= both["gradient_ratio"]
            losses = output[f"losses_both_ways_{value_format}"]
            assert all(math.isfinite(loss) for loss in losses)
            # compressed weights and gradients stay close to dense FSDP2 over 6 steps
            assert losses == pytest.approx(output["losses_dense_fsdp"], abs=0.05)


def test_all_gather_format_is_checked_at_construction():
    with pytest.raises(ValueError, match="all_gather must be one of"):
        CompressedFSDPStrategy(all_gather="int4")
    with pytest.raises(ValueError, match="int4_delta' needs an even block_size, got 9"):
        CompressedAllGather(CompressedCommState(GradientCompressor()), "0", "int4_delta", 9)


def test_nibbles_round_trip_every_code_in_place():
    codes = torch.arange(-7, 8, dtype=torch.int8).repeat(2)[:-1]  # 29 codes: pad to even
    codes = torch.cat([codes, torch.zeros(1, dtype=torch.int8)])
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == codes.numel() // 2
    assert torch.equal(unpack_nibbles(packed), codes)
    # entry 2i in the low nibble: -7 + 8 = 1 low, -6 + 8 = 2 high
    assert int(packed[0]) == 1 | (2 << 4)


@pytest.mark.parametrize("bits, levels", [(8, 127), (4, 7)])
def test_block_messages_decode_within_half_a_step(bits, levels):
    """Each entry comes back within half its block's step ``max|x_b| / levels``; the tail of
    the last block is padding; the message has the documented size."""
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * torch.linspace(
        0.01, 3, 1000
    )
    slot = encode_block_slot(x, 64, bits)
    assert slot.numel() == block_slot_nbytes(1000, 64, bits) == 4 * 16 + 16 * 64 * bits // 8
    decoded = decode_block_slot(slot, 1000, 64, bits)
    padded = torch.cat([x, x.new_zeros(24)]).view(16, 64)
    step = padded.abs().amax(dim=1, keepdim=True) / levels
    error = torch.cat([x - decoded, x.new_zeros(24)]).view(16, 64).abs()
    assert bool((error <= step / 2 * (1 + 1e-5)).all())
    assert bool((error > 0).any())  # it is lossy
    # the largest entry of every block comes back to float rounding (code +-levels)
    largest = torch.arange(16) * 64 + padded.abs().argmax(dim=1)
    assert torch.allclose(decoded[largest[:15]], x[largest[:15]], rtol=1e-6, atol=0)


def test_all_gather_option_keeps_the_strategys_collective():
    """The option must not shadow ``Strategy.all_gather``, which callbacks call on any strategy."""
    strategy = CompressedFSDPStrategy(all_gather="int8")
    assert strategy.all_gather_format == "int8"
    gathered = strategy.all_gather(torch.tensor([3.0]))  # not set up: returns its input
    assert gathered.tolist() == [3.0]


def test_nan_on_one_rank_reaches_every_shard_without_hanging(job):
    rank0, rank1 = job[1]
    assert rank0["poisoned_all_nan"] and rank1["poisoned_all_nan"]
    assert rank0["poisoned_nonfinite_messages"] == 0  # rank 0's gradients were finite
    # per FSDP unit: the NaN chunk sent to rank 0 and the NaN chunk rank 1 keeps
    assert rank1["poisoned_nonfinite_messages"] == 4


def test_configure_model_sharding_wins(job):
    _, (rank0, _) = job
    assert rank0["units"] == ["body"]  # the policy would have made each Linear a unit too
    assert rank0["calls"] == 3  # 3 steps, one compressed reduce-scatter each


def test_frozen_parameters_can_stay_whole_on_every_rank(job):
    for result in job[1]:
        # FSDP2's default shards the frozen base too; "replicate" leaves it out of FSDP
        assert result["shard_sharded"] == [
            "adapter.bias", "adapter.weight", "base.bias", "base.weight",
        ]  # fmt: skip
        assert result["replicate_sharded"] == ["adapter.bias", "adapter.weight"]
        # the same training either way: frozen weights never move, the adapter learns alike
        assert result["shard_base_moved"] == 0.0 and result["replicate_base_moved"] == 0.0
        assert result["adapter_moved"] > 1e-4
        assert result["replicate_vs_shard"] <= 1e-6
        # one compressed reduce-scatter per step, of the trainable gradients only, both ways
        assert result["shard_calls"] == result["replicate_calls"] == 3


def test_compressed_run_stays_close_to_dense(job):
    _, (rank0, _) = job
    # Compression changes the parameters, but the loss after each step stays within 0.01 of the
    # dense run (measured: at most 0.006 over these 6 steps).
    assert rank0["compressed_vs_fsdp"] > 0
    for compressed, dense in zip(rank0["losses_compressed"], rank0["losses_fsdp"], strict=True):
        assert abs(compressed - dense) <= 0.01


def test_compressed_run_sends_twelve_times_fewer_bytes(job):
    _, (rank0, _) = job
    assert rank0["dense_bytes"] / rank0["wire_bytes"] >= 12
    assert rank0["residual_norm"] > 0


def test_mixed_precision_passes_through(job):
    _, (rank0, _) = job
    # bf16 parameters and gradients: the dense baseline is 2 bytes per entry, so about 6.9x
    assert 6 <= rank0["bf16_ratio"] < 8
    for mixed, dense in zip(rank0["losses_bf16"], rank0["losses_fsdp"], strict=True):
        assert abs(mixed - dense) <= 0.03


def test_all_gather_fallback_gives_the_same_result(job):
    _, (rank0, _) = job
    assert rank0["all_gather_vs_all_to_all"] == 0.0
    assert rank0["losses_all_gather"] == rank0["losses_compressed"]


def test_metrics_reach_the_logger_every_step(job):
    out, _ = job
    with open(out / "logs" / "compressed" / "version_0" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["comm/wire_bytes"]]
    assert [int(row["step"]) for row in rows] == list(range(6))
    for row in rows:
        assert float(row["comm/compression_ratio"]) >= 12
        assert float(row["comm/dense_bytes"]) / float(row["comm/wire_bytes"]) >= 12
        assert float(row["comm/residual_norm"]) > 0
        assert float(row["comm/seconds"]) > 0
        assert row["comm/compressing"] == "1.0"
        assert row["comm/nonfinite_messages"] == "0.0"


def test_full_state_export_loads_on_one_device(job):
    from job_model import job_minilm

    out, (rank0, _) = job
    state = torch.load(out / "full_state.pt", weights_only=True)
    task = job_minilm()
    task.load_state_dict(state)
    for name, param in task.named_parameters():
        assert float(param.detach().double().sum()) == pytest.approx(
            rank0["parameter_sums"][name], rel=1e-9
        )


@pytest.mark.parametrize("layout", ["sharded", "single_file"])
def test_resume_mid_run_reproduces_the_uninterrupted_run(job, layout):
    _, (rank0, rank1) = job
    for rank in (rank0, rank1):
        assert rank[f"saved_residual_norm_{layout}"] > 0  # there were residuals to restore
        assert rank[f"losses_resumed_{layout}"] == rank["losses_uninterrupted"]
        assert rank[f"resumed_vs_uninterrupted_{layout}"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [3, 4])
def test_resume_on_more_ranks_reproduces_the_uninterrupted_run(ranks, launch_two_ranks, tmp_path):
    """Every one of 3 or 4 ranks restores its own residuals (uneven shards of the MiniLM
    layers)."""
    results = launch_two_ranks("resume", tmp_path, 1800, ranks=ranks)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stdout[-6000:]}"
    for rank in range(ranks):
        output = json.loads((tmp_path / f"resume.rank{rank}.json").read_text())
        for layout in ("sharded", "single_file"):
            assert output[f"saved_residual_norm_{layout}"] > 0
            assert output[f"losses_resumed_{layout}"] == output["losses_uninterrupted"]
            assert output[f"resumed_vs_uninterrupted_{layout}"] == 0.0


def test_ddp_hook_parity(job):
    _, (rank0, rank1) = job
    assert rank0["ddp_hook_dense_vs_ddp"] <= 1e-6
    assert rank0["losses_ddp_hook_dense"] == pytest.approx(rank0["losses_ddp"], abs=1e-6)
    assert rank0["ddp_hook_vs_ddp"] > 0
    for compressed, dense in zip(rank0["losses_ddp_hook"], rank0["losses_ddp"], strict=True):
        assert abs(compressed - dense) <= 0.01
    # every replica applies the same decoded gradient
    assert rank1["rank_spread_ddp_hook"] == 0.0
    assert rank0["ddp_hook_iterations"] == 6
    assert rank0["ddp_hook_wire_bytes"] < rank0["ddp_hook_dense_bytes"]


def test_ddp_resume_restores_every_ranks_residuals(job):
    for rank in job[1]:
        assert rank["ddp_saved_residual_norm"] > 0
        assert rank["ddp_restored_residual_norm"] == pytest.approx(
            rank["ddp_saved_residual_norm"], rel=1e-6
        )
        assert rank["ddp_restored_step"] == 3
        # the first iteration after DDP wraps the model again is sent dense (its buckets are
        # rebuilt after it), so the resumed run is close to the uninterrupted one, not identical
        assert rank["losses_ddp_resumed"][:4] == rank["losses_ddp_hook"][:4]
        for resumed, straight in zip(
            rank["losses_ddp_resumed"], rank["losses_ddp_hook"], strict=True
        ):
            assert abs(resumed - straight) <= 0.01
        assert rank["ddp_resumed_vs_uninterrupted"] < 1e-3


def test_error_feedback_helps(job):
    _, (rank0, _) = job
    # relative distance to the optimum after 200 steps: measured dense 3.5e-5, with feedback
    # 0.091, without 0.647 (the other rank's small entries are never sent)
    assert rank0["error_dense"] < 1e-3
    assert rank0["error_feedback"] < 0.25 * rank0["error_no_feedback"]


def test_a_dying_rank_stops_the_other(tmp_path, launch_two_ranks):
    started = time.monotonic()
    # a rank that dies is what this test is about: never run it twice
    survivor, dead = launch_two_ranks(
        "die", tmp_path, timeout=DEATH_BOUND_S, retry_native_crash=False
    )
    assert time.monotonic() - started < DEATH_BOUND_S
    assert dead.returncode == 3
    assert survivor.returncode != 0
    assert "rank 0 stopped: a collective failed" in survivor.stdout


def test_a_native_crash_runs_the_job_once_more_and_says_so(tmp_path, launch_two_ranks):
    out = tmp_path / "job"
    with pytest.warns(UserWarning, match=r"(?s)'abort_once' crashed natively.*rank 0 \(signal 6\)"):
        results = launch_two_ranks("abort_once", out, timeout=DEATH_BOUND_S)
    assert [result.returncode for result in results] == [0, 0]
    assert json.loads((out / "abort_once.rank0.json").read_text()) == {"rank": 0}
    # the crashed attempt is kept apart: rank 1 finished in it, rank 0 did not
    crashed = tmp_path / "job-crashed"
    assert sorted(path.name for path in crashed.iterdir()) == ["abort_once.rank1.json"]


# ------------------------------------------------------------------------------ in-process
def test_shard_targets_on_minilm(classifier_task):
    # BertModel's _no_split_modules, and the encoder's ModuleList of six BertLayers
    assert transformer_block_classes(classifier_task) == {"BertEmbeddings", "BertLayer"}
    targets = shard_targets(classifier_task)
    names = [type(m).__name__ for m in targets]
    assert names == ["BertEmbeddings"] + ["BertLayer"] * 6 + ["BertForSequenceClassification"]
    owners: dict[int, int] = {}
    for unit in targets:
        for param in unit.parameters():
            owners.setdefault(id(param), id(unit))
    assert len(owners) == len(list(classifier_task.parameters()))  # every parameter in a unit


def test_shard_targets_policies():
    root = torch.nn.Module()
    root.body = torch.nn.Sequential(
        torch.nn.Linear(10, 10), torch.nn.Sequential(torch.nn.Linear(10, 100))
    )
    # by size: the inner Linear(10, 100) has 1100 parameters, the outer Sequential 110 left
    sized = shard_targets(root, class_names=[], min_num_params=1000)
    assert [type(m).__name__ for m in sized] == ["Linear", "Sequential"]
    assert sized[0] is root.body[1][0] and sized[1] is root.body
    by_name = shard_targets(root, class_names=["Linear"])
    assert by_name[:2] == [root.body[0], root.body[1][0]] and len(by_name) == 2
    with pytest.raises(ValueError, match="min_num_params"):
        shard_targets(root, min_num_params=0)
    root.scale = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="owns parameters directly"):
        shard_targets(root)


def test_reduce_op_scale():
    assert reduce_op_scale(dist.ReduceOp.SUM, 4) == 1.0
    assert reduce_op_scale(dist.ReduceOp.AVG, 4) == 0.25
    assert reduce_op_scale(dist.ReduceOp.PREMUL_SUM(0.125), 4) == 0.125
    with pytest.raises(ValueError, match="SUM, AVG and PREMUL_SUM"):
        reduce_op_scale(dist.ReduceOp.MAX, 4)


@pytest.mark.parametrize("numel", [4096, 10_000, 65_537])
@pytest.mark.parametrize("selection", ["exact", "sampled"])
def test_slots_hold_every_message(numel, selection):
    compressor = GradientCompressor(density=0.15, selection=selection)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    message = compressor.compress(x)
    layout = compressor.slot_layout(numel, x.dtype)
    slot = slot_nbytes(compressor, numel, x.dtype, dense=False)
    assert slot == layout.nbytes and slot % 16 == 0
    # the slot holds the message's parts (its 16-byte head replaces the 32-byte header)
    assert message.count <= layout.capacity and slot >= message.nbytes - 16
    if selection == "exact":
        assert layout.capacity == message.count == math.ceil(0.15 * numel)
        assert slot - (message.nbytes - 16) < 16  # no room wasted but the alignment
    dense = slot_nbytes(compressor, numel, x.dtype, dense=True)
    assert dense == -(-(16 + 4 * numel) // 16) * 16


def test_comm_state_residual_life_cycle():
    state = CompressedCommState(GradientCompressor(), warmup_steps=2)
    assert state.residual("a", 8, torch.device("cpu")) is None  # warm-up: nothing to carry
    state.step = 2
    residual = state.residual("a", 8, torch.device("cpu"))
    assert residual is not None and torch.equal(residual, torch.zeros(8))
    residual += 1
    assert state.residual("a", 8, torch.device("cpu")) is residual
    restarted = state.residual("a", 16, torch.device("cpu"))  # DDP rebuilt its buckets
    assert restarted is not None and torch.equal(restarted, torch.zeros(16))
    saved = state.state_dict()
    other = CompressedCommState(GradientCompressor(), residual_dtype="bfloat16")
    other.load_state_dict(saved)
    assert other.step == 2 and other.residuals["a"].dtype == torch.bfloat16
    assert (
        CompressedCommState(GradientCompressor(), error_feedback=False).residual(
            "a", 8, torch.device("cpu")
        )
        is None
    )


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_chunks_are_flagged_counted_and_reduced_by_policy(policy):
    """Rank 0 of 3 sends a chunk with Inf to rank 1 and holds a NaN in its own chunk: both are
    counted, the residual stays clean, and each receiver's sum follows the policy."""
    state = CompressedCommState(GradientCompressor(min_numel=0, nonfinite=policy))
    chunks = torch.randn(3, 64)
    chunks[1, 3] = float("inf")
    chunks[0, 5] = float("nan")
    send = encode_slots(chunks, 0, state, "unit", dense=False)
    assert torch.equal(state.residuals["unit/to1"], torch.zeros(64))  # nothing non-finite kept
    assert state.residuals["unit/to2"].any()  # the good chunk left its unsent part
    own = own_chunk(chunks[0], state)
    assert state.take_stats().nonfinite == 2 and state.take_stats().nonfinite == 0
    received = torch.zeros(64)
    state.compressor.decode_from(send[1], received, accumulate=True)
    if policy == "raise":  # NaN travels on, as in an uncompressed reduction
        assert received.isnan().all() and own.isnan().any()
    else:  # the bad contributions are left out, the good ones kept
        assert torch.equal(received, torch.zeros(64)) and torch.equal(own, torch.zeros(64))
    good = torch.zeros(64)
    state.compressor.decode_from(send[2], good, accumulate=True)
    assert good.isfinite().all() and good.any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"density": 0.0}, "density"),
        ({"block_size": 100}, "block_size"),
        ({"value_format": "int4"}, "value_format"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"residual_dtype": "float16"}, "residual_dtype"),
        ({"exchange": "ring"}, "exchange"),
        ({"min_num_params": 0}, "min_num_params"),
        ({"param_dtype": "fp8"}, "param_dtype"),
        ({"nonfinite": "ignore"}, "nonfinite"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressedFSDPStrategy(**kwargs)


def test_ddp_strategy_bad_arguments():
    with pytest.raises(ValueError, match="density"):
        CompressedDDPStrategy(density=1.5)
    with pytest.raises(ValueError, match="ddp_comm_hook is set by CompressedDDPStrategy"):
        CompressedDDPStrategy(ddp_comm_hook=lambda state, bucket: None)


def test_strategies_are_registered_by_name():
    from lightning.pytorch import Trainer

    trainer = Trainer(strategy="fsdp_compressed", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, CompressedFSDPStrategy)
    assert trainer.strategy.comm_state.compressor.density == 0.15
    trainer = Trainer(strategy="ddp_compressed", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, CompressedDDPStrategy)


def test_probe_sends_exactly_and_leaves_residuals_and_step_alone():
    """A signal pass's gradients cross dense and exact; nothing of them stays in a residual."""
    state = CompressedCommState(GradientCompressor(min_numel=0, density=0.1))
    state.step = 5
    chunks = torch.randn(2, 4096)
    encode_slots(chunks, 0, state, "unit", dense=not state.compressing)  # a real step
    before = state.residuals["unit/to1"].clone()
    assert before.any()
    with state.probe():
        assert not state.compressing
        probe = torch.randn(2, 4096)
        send = encode_slots(probe, 0, state, "unit", dense=not state.compressing)
        assert state.residual("unit/to1", 4096, torch.device("cpu")) is None
    received = torch.zeros(4096)
    state.compressor.decode_from(send[1], received, dense=True)
    assert torch.equal(received, probe[1])  # exact: no compression, no residual added
    assert torch.equal(state.residuals["unit/to1"], before) and state.step == 5
    assert state.compressing
    state.take_stats()
    with state.probe():  # a probe's traffic and non-finite messages are not the run's
        state.recorded.wire_bytes += 100
        state.count_nonfinite(torch.tensor([True, True]))
    state.recorded.wire_bytes += 7
    state.count_nonfinite(torch.tensor([True, False]))
    assert state.take_stats(read_device=False) == CommStats(wire_bytes=7)
    assert state.take_stats() == CommStats(nonfinite=1)  # the device count waited for this read


def test_residual_restarts_with_a_warning_when_its_parameters_change(caplog):
    state = CompressedCommState(GradientCompressor())
    layout = (("0.weight", (8, 8)), ("0.bias", (8,)))
    residual = state.residual("unit/to1", 72, torch.device("cpu"), layout)
    assert residual is not None
    residual += 1.0
    assert state.residual("unit/to1", 72, torch.device("cpu"), layout) is residual
    # same size, other parameters: the freezer froze 0.weight and unfroze 1.weight (8 x 8)
    other = (("0.bias", (8,)), ("1.weight", (8, 8)))
    with caplog.at_level("WARNING", logger="lightning_3d.collectives"):
        restarted = state.residual("unit/to1", 72, torch.device("cpu"), other)
    assert restarted is not None and not restarted.any()
    assert "the parameters behind residual unit/to1 changed" in caplog.text
    # a residual that did not exist yet (warm-up) still learns its layout
    assert state.residual("unit/to2", 72, torch.device("cpu"), other) is not None
    state.warmup_steps = 10
    assert state.residual("unit/to3", 72, torch.device("cpu"), layout) is None
    assert state.layouts["unit/to3"] == layout
    state.warmup_steps = 0
    with caplog.at_level("WARNING", logger="lightning_3d.collectives"):
        caplog.clear()
        assert state.residual("unit/to3", 72, torch.device("cpu"), layout) is not None
    assert "changed" not in caplog.text
    saved = state.state_dict()  # the layout travels with the residual
    again = CompressedCommState(GradientCompressor())
    again.load_state_dict(saved)
    assert again.layouts["unit/to1"] == other


def test_trainable_layout_leaves_out_frozen_and_nested_unit_parameters():
    class Unit(torch.nn.Module):  # stands in for a module fully_shard made an FSDP unit
        def set_custom_reduce_scatter(self, reduce_scatter: Any) -> None:
            raise AssertionError("not called")

    outer = torch.nn.Sequential(torch.nn.Linear(4, 3), Unit())
    outer[1].add_module("inner", torch.nn.Linear(3, 2))
    outer[0].bias.requires_grad_(False)
    from lightning_3d.collectives import own_parameters, trainable_layout

    assert trainable_layout(outer) == (("0.weight", (3, 4)),)
    assert trainable_layout(outer[1]) == (("inner.weight", (2, 3)), ("inner.bias", (2,)))
    # names found once; requires_grad read from the parameters registered now
    names = [name for name, _ in own_parameters(outer)]
    outer[0].bias.requires_grad_(True)
    outer[0].weight = torch.nn.Parameter(torch.zeros(3, 4), requires_grad=False)  # swapped
    assert trainable_layout(outer, names) == (("0.bias", (3,)),)


def test_callback_tensors_split_into_references_and_join_back_as_dtensors() -> None:
    """What CompressedFSDPStrategy does with a callback state's DTensors around a sharded
    checkpoint (here on a one-rank mesh): references in the metadata, the tensors by key, empty
    templates of the same layout to load into, and the state rebuilt from them."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_3d.sharding import (
        SHARDED_REF,
        gather_sharded,
        join_sharded,
        sharded_templates,
        split_sharded,
    )

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        mask = distribute_tensor(torch.tensor([[True, False], [False, True]]), mesh, [Shard(0)])
        state = {"Pruner": {"masks": {"w": mask}, "step": 4, "pairs": [(1, torch.ones(2))]}}
        plain, tensors = split_sharded(state)
        reference = plain["Pruner"]["masks"]["w"]
        assert reference == {
            SHARDED_REF: "Pruner/masks/w",
            "shape": [2, 2],
            "dtype": "bool",
            "placements": [["shard", 0]],
        }
        assert list(tensors) == ["Pruner/masks/w"] and tensors["Pruner/masks/w"] is mask
        assert plain["Pruner"]["step"] == 4 and torch.equal(
            plain["Pruner"]["pairs"][0][1], torch.ones(2)
        )
        templates = sharded_templates(plain, mesh)
        template = templates["Pruner/masks/w"]
        assert template.shape == (2, 2) and template.dtype == torch.bool
        assert template.placements == mask.placements
        joined = join_sharded(plain, {"Pruner/masks/w": mask})
        assert joined["Pruner"]["masks"]["w"] is mask and joined["Pruner"]["step"] == 4
        whole = gather_sharded(state)["Pruner"]["masks"]["w"]
        assert not hasattr(whole, "device_mesh")
        assert whole.tolist() == [[True, False], [False, True]]
    finally:
        dist.destroy_process_group()


def test_named_tuples_in_callback_states_keep_their_type() -> None:
    from collections import namedtuple

    from lightning_3d.sharding import gather_sharded, join_sharded, split_sharded

    Pair = namedtuple("Pair", "step weights")
    state = {"pair": Pair(3, torch.ones(2))}
    plain, tensors = split_sharded(state)
    assert isinstance(plain["pair"], Pair) and tensors == {}
    assert isinstance(join_sharded(plain, tensors)["pair"], Pair)
    assert gather_sharded(state)["pair"].step == 3


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_lora_on_the_real_smollm2_sends_only_adapter_gradients(tmp_path, launch_two_ranks, ranks):
    """SmolLM2 with LoRA on q/v under CompressedFSDPStrategy, 2 and 3 ranks (3: the rank-4
    adapters split unevenly), 3 steps: the frozen base sharded (FSDP2's default), sharded with
    int8 all-gathers, or kept whole on every rank."""
    results = launch_two_ranks("smollm2_lora", tmp_path, timeout=1500, ranks=ranks)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stdout[-6000:]}"
    for rank in range(ranks):
        found = json.loads((tmp_path / f"smollm2_lora.rank{rank}.json").read_text())
        base = found["base_bytes"]
        assert found["shard_adapters"] == 30 * 2 * 2  # lora_A and lora_B of q and v, 30 blocks
        # lora_A (4 x 576) pads to 6 rows on 3 ranks; lora_B's 576 and 192 rows split evenly
        padded = found["adapter_bytes"] + (30 * 2 * 2 * 576 * 4 if ranks == 3 else 0)
        assert found["padded_adapter_bytes"] == padded
        for name in ("shard", "shard_int8", "replicate"):
            assert found[f"{name}_base_moved"] == 0.0  # the base never changes
            assert found[f"{name}_adapters_moved"] > 1e-4
            assert found[f"{name}_sharded_adapters"] == found["shard_adapters"]
            # only adapter gradients are reduce-scattered: 3 steps of at most every adapter
            # (padded to the ranks), nothing of the base
            dense = found[f"{name}_reduce_scatter_dense_bytes"]
            assert 0 < dense <= 3 * padded
        assert found["shard_sharded_base"] > 0 and found["replicate_sharded_base"] == 0
        # kept whole, the base is never all-gathered; int8 all-gathers send about a quarter
        sent = found["shard_int8_all_gather_wire_bytes"]
        assert 0 < sent < 0.3 * found["shard_int8_all_gather_dense_bytes"]
        # the same training whether the base is sharded or whole; int8 weights change the
        # forward a little, and AdamW's first steps move every adapter entry by about the
        # learning rate whatever its gradient, so that run is only checked to train (above)
        assert found["replicate_vs_shard"] <= 1e-5
        print(
            f"rank {rank}: median step s shard {found['shard_step_s']:.2f}, shard+int8 "
            f"{found['shard_int8_step_s']:.2f}, replicate {found['replicate_step_s']:.2f}; "
            f"base {base / 2**20:.0f} MiB"
        )
