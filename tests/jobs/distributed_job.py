"""Distributed scenarios for tests/test_strategies.py, run on each of 2 CPU ranks (gloo).

Launched as ``LOCAL_RANK=r MASTER_ADDR=... MASTER_PORT=... python distributed_job.py SCENARIOS OUT``
(Lightning's manual launch; SCENARIOS is a comma-separated list); every rank writes
``OUT/<scenario>.rank<r>.json``.

Scenarios:
  parity: the real MiniLM on 48 Rotten Tomatoes reviews (2 epochs of 3 steps), dropout off so runs
    differ only by their collectives: FSDP2's own reduce-scatter, ours sent dense, ours compressed
    (with metrics through a CSV logger), and a full-state export.
  resume: a compressed run interrupted after 3 steps and resumed from its checkpoint, sharded and
    single-file, against the uninterrupted run.
  ddp: DDP, and DDP through the compressed hook sent dense and compressed.
  feedback: FSDP2 on a separable quadratic, compressed with and without error feedback, and dense.
  reduce_ops: our reduce-scatter sent dense against FSDP2's own, on odd shapes, for AVG, a
    gradient divide factor and fp16 reduction.
  own_sharding: a LightningModule whose configure_model shards it; the strategy keeps that.
  die: rank 1 exits in its third step; rank 0 must stop with an error (not hang).
  curriculum: CurriculumSampler (loss scores, linear pacing, 80% budget) under DDP and under
    CompressedFSDPStrategy: each rank's batches per epoch, the epoch plans and the final scores.
  freezer: SensitivityFreezer (10% trainable after 2 steps) on the real MiniLM under DDP, FSDP2
    and compressed FSDP2: the frozen set, the Fisher scores, what the frozen tensors did after
    freezing, the ranks' parameter spread and the optimizer's state.
  freezer_resume: under FSDP2, a run frozen after 2 steps, checkpointed (sharded) and stopped
    after 3, then resumed, against the uninterrupted run.
  pruner: ProgressivePruner (50%, movement scores, masks updated at steps 2 and 4) on the real
    MiniLM under DDP and FSDP2: each rank's masks, the sparsity, the pruned weights' values and
    the ranks' parameter spread.
  pruner_resume: under FSDP2, a pruning run checkpointed (sharded) and stopped after 3 steps,
    then resumed, against the uninterrupted run.
  sharded_checkpoint: a compressed FSDP2 run that saves a sharded checkpoint at its last step
    and the same weights as one full state dict, for the export's consolidation test.
  plan: the whole ThreeDPlan (data budget, distillation from the warm-up snapshot, freezer,
    heads+neurons pruning, int8 QAT) on the real MiniLM under DDP: the phases, the frozen set,
    the masks, the parameters before conversion, the data scores and the teacher's samples.
  vocabulary: VocabularyTrimmer under DDP with other reviews on every rank: the ids each rank
    saw and kept, and the ranks' parameter spread.
  depth: DepthPruner (1 of 2 blocks) under DDP with other reviews on every rank: each rank's own
    block influence, the blocks removed, and the ranks' parameter spread.

"The real MiniLM" is all-MiniLM-L6-v2's embeddings and its first 2 transformer blocks
(``job_model.py``). ``JOB_RANKS`` (default 2) sets the number of ranks (``sharded_checkpoint``,
``plan``, ``vocabulary`` and ``depth`` also run on 3).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from job_model import job_minilm  # beside this script: the first entry of sys.path
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Subset

from lightning_3d.compression import GradientCompressor
from lightning_3d.sampling import with_curriculum
from lightning_3d.strategies import CompressedDDPStrategy, CompressedFSDPStrategy

RANK = int(os.environ["LOCAL_RANK"])
RANKS = int(os.environ.get("JOB_RANKS", "2"))
STEPS_PER_EPOCH, EPOCHS, BATCH = 3, 2, 8


class LossRecorder(Callback):
    """Keeps every training loss; optionally stops after ``stop_at_step`` steps (interrupts)."""

    def __init__(self, stop_at_step: int | None = None) -> None:
        self.losses: list[float] = []
        self.stop_at_step = stop_at_step

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *args: Any) -> None:
        self.losses.append(float(outputs["loss"]))
        if trainer.global_step == self.stop_at_step:
            trainer.should_stop = True


def make_task() -> Any:
    """The jobs' MiniLM (:func:`job_model.job_minilm`), dropout off."""
    pl.seed_everything(0, verbose=False)
    task = job_minilm(warmup_ratio=0.0, learning_rate=1e-4)
    for module in task.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return task


_training_split: list[Any] = []


def training_split(tokenizer: Any) -> Any:
    """The tokenized Rotten Tomatoes training split (``max_length=48``), built once per process."""
    from lightning_3d.data import RottenTomatoes

    if not _training_split:
        data = RottenTomatoes(tokenizer=tokenizer, batch_size=BATCH, max_length=48)
        data.setup("fit")
        _training_split.append(data.splits["train"])
    return _training_split[0]


def make_loader(task: Any) -> DataLoader:
    from lightning_3d.data import PaddingCollator

    # STEPS_PER_EPOCH batches per rank on any number of ranks, so step 3 ends an epoch
    # everywhere (Lightning does not restore a shuffled order mid-epoch)
    subset = Subset(training_split(task.tokenizer), range(RANKS * BATCH * STEPS_PER_EPOCH))
    pad = int(task.tokenizer.pad_token_id)
    return DataLoader(subset, batch_size=BATCH, shuffle=True, collate_fn=PaddingCollator(pad))


def full_parameters(task: Any) -> dict[str, torch.Tensor]:
    """Unsharded copies of every parameter (a collective under FSDP2)."""
    out = {}
    for name, param in task.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        out[name] = full.detach().cpu().clone()
    return out


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def own_shards(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's own part of each tensor: its local shard under FSDP2 (no collective), the
    whole tensor under DDP."""
    return {
        name: (t.to_local() if hasattr(t, "to_local") else t).detach().cpu()
        for name, t in tensors.items()
    }


def expected_shard(full: torch.Tensor) -> torch.Tensor:
    """Rank ``RANK``'s part of ``full`` as FSDP2 shards it: ``torch.chunk`` along dim 0, empty
    past the last chunk."""
    chunks = torch.chunk(full, RANKS, dim=0)
    return chunks[RANK] if len(chunks) > RANK else full[:0]


def shard_difference(task: Any, expected: dict[str, torch.Tensor]) -> float:
    """Largest difference between this rank's own parameter shards and the matching part of an
    independently computed model (a DDP run of the same training)."""
    own = own_shards(dict(task.named_parameters()))
    differences = [(own[n] - expected_shard(expected[n])).abs() for n in own]
    return max(float(d.max()) if d.numel() else 0.0 for d in differences)


def rank_spread(params: dict[str, torch.Tensor]) -> float:
    """Largest difference between this rank's parameters and rank 0's."""
    spread = 0.0
    for value in params.values():
        reference = value.clone()
        dist.broadcast(reference, src=0)
        spread = max(spread, float((value - reference).abs().max()))
    return spread


def fit(
    strategy: Any,
    *,
    ckpt_path: str | None = None,
    stop_at_step: int | None = None,
    callbacks: list[Callback] | None = None,
    logger: Any = False,
) -> tuple[Any, list[float]]:
    task = make_task()
    recorder = LossRecorder(stop_at_step)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=RANKS,
        strategy=strategy,
        max_steps=STEPS_PER_EPOCH * EPOCHS,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[recorder, *(callbacks or [])],
        # only the caller's own ModelCheckpoint writes checkpoints (Lightning's default one
        # would write into the working directory)
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks or []),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(
        task, train_dataloaders=with_curriculum(trainer, make_loader(task)), ckpt_path=ckpt_path
    )
    return task, recorder.losses


_compressed_run: dict[str, Any] = {}


def compressed_run(out: Path) -> dict[str, Any]:
    """The compressed FSDP run every scenario compares with (run once per job)."""
    if not _compressed_run:
        logger = CSVLogger(out / "logs", name="compressed", version=0)
        strategy = CompressedFSDPStrategy(density=0.15)
        task, losses = fit(strategy, logger=logger)
        params = full_parameters(task)
        strategy.save_full_state_dict(out / "full_state.pt")
        _compressed_run.update(strategy=strategy, losses=losses, params=params)
    return _compressed_run


def parity(out: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    baseline, result["losses_fsdp"] = fit(CompressedFSDPStrategy(compress=False))
    reference = full_parameters(baseline)

    dense, result["losses_dense"] = fit(CompressedFSDPStrategy(warmup_steps=10**6))
    result["dense_vs_fsdp"] = max_difference(full_parameters(dense), reference)

    run = compressed_run(out)
    strategy = run["strategy"]
    result["losses_compressed"] = run["losses"]
    result["compressed_vs_fsdp"] = max_difference(run["params"], reference)
    result["wire_bytes"] = strategy.comm_totals.wire_bytes
    result["dense_bytes"] = strategy.comm_totals.dense_bytes
    result["residual_norm"] = strategy.comm_state.residual_norm()
    result["parameter_sums"] = {k: float(v.double().sum()) for k, v in run["params"].items()}

    mixed = CompressedFSDPStrategy(param_dtype="bfloat16", reduce_dtype="bfloat16")
    _, result["losses_bf16"] = fit(mixed)
    result["bf16_ratio"] = mixed.comm_totals.dense_bytes / mixed.comm_totals.wire_bytes

    gathered, result["losses_all_gather"] = fit(CompressedFSDPStrategy(exchange="all_gather"))
    result["all_gather_vs_all_to_all"] = max_difference(full_parameters(gathered), run["params"])
    return result


def resume(out: Path) -> dict[str, Any]:
    run = compressed_run(out)
    result: dict[str, Any] = {"losses_uninterrupted": run["losses"]}
    for sharded in (True, False):
        tag = "sharded" if sharded else "single_file"
        folder = out / f"checkpoints_{tag}"
        checkpoint = ModelCheckpoint(dirpath=folder, filename="first", every_n_train_steps=3)
        first_strategy = CompressedFSDPStrategy(save_distributed_checkpoint=sharded)
        _, first = fit(first_strategy, stop_at_step=3, callbacks=[checkpoint])
        result[f"saved_residual_norm_{tag}"] = first_strategy.comm_state.residual_norm()
        resumed_strategy = CompressedFSDPStrategy(save_distributed_checkpoint=sharded)
        resumed, second = fit(resumed_strategy, ckpt_path=str(folder / "first.ckpt"))
        result[f"losses_resumed_{tag}"] = first + second
        result[f"resumed_vs_uninterrupted_{tag}"] = max_difference(
            full_parameters(resumed), run["params"]
        )
    return result


def sharded_checkpoint(out: Path) -> dict[str, Any]:
    last = STEPS_PER_EPOCH * EPOCHS
    checkpoint = ModelCheckpoint(dirpath=out / "sharded", filename="last", every_n_train_steps=last)
    strategy = CompressedFSDPStrategy(save_distributed_checkpoint=True)
    fit(strategy, callbacks=[checkpoint])
    strategy.save_full_state_dict(out / "full_state.pt")
    return {"checkpoint": checkpoint.last_model_path or checkpoint.best_model_path}


def ddp(out: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    plain, result["losses_ddp"] = fit(DDPStrategy(process_group_backend="gloo"))
    reference = full_parameters(plain)
    for tag, warmup in (("ddp_hook_dense", 10**6), ("ddp_hook", 2)):
        strategy = CompressedDDPStrategy(warmup_steps=warmup, process_group_backend="gloo")
        task, result[f"losses_{tag}"] = fit(strategy)
        params = full_parameters(task)
        result[f"{tag}_vs_ddp"] = max_difference(params, reference)
        result[f"rank_spread_{tag}"] = rank_spread(params)
        result[f"{tag}_iterations"] = strategy.comm_state.step
        result[f"{tag}_wire_bytes"] = strategy.comm_totals.wire_bytes
        result[f"{tag}_dense_bytes"] = strategy.comm_totals.dense_bytes
        if tag == "ddp_hook":
            uninterrupted = params

    # resume: DDP checkpoints are one file from rank 0, holding every rank's residuals
    folder = out / "checkpoints_ddp"
    checkpoint = ModelCheckpoint(dirpath=folder, filename="first", every_n_train_steps=3)
    first_strategy = CompressedDDPStrategy(warmup_steps=2, process_group_backend="gloo")
    _, first = fit(first_strategy, stop_at_step=3, callbacks=[checkpoint])
    saved = first_strategy.comm_state.residual_norm()
    resumed_strategy = CompressedDDPStrategy(warmup_steps=2, process_group_backend="gloo")
    loader = resumed_strategy.load_checkpoint
    restored: dict[str, float] = {}

    def load_and_record(*args: Any, **kwargs: Any) -> Any:
        loaded = loader(*args, **kwargs)
        restored["residual_norm"] = resumed_strategy.comm_state.residual_norm()
        restored["step"] = resumed_strategy.comm_state.step
        return loaded

    resumed_strategy.load_checkpoint = load_and_record  # type: ignore[method-assign]
    resumed, second = fit(resumed_strategy, ckpt_path=str(folder / "first.ckpt"))
    result["ddp_saved_residual_norm"] = saved
    result["ddp_restored_residual_norm"] = restored["residual_norm"]
    result["ddp_restored_step"] = restored["step"]
    result["losses_ddp_resumed"] = first + second
    result["ddp_resumed_vs_uninterrupted"] = max_difference(full_parameters(resumed), uninterrupted)
    return result


class Vector(torch.nn.Module):
    def __init__(self, numel: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(numel))

    def forward(self) -> torch.Tensor:
        return self.weight  # FSDP2 gathers it before, and reduce-scatters its gradient after


def feedback(out: Path) -> dict[str, Any]:
    """Rank ``r`` minimizes ``0.5 * ||w - t_r||^2``; together they minimize towards the mean target.

    Targets have a few large and many small entries, and differ between ranks. Top-k without error
    feedback never sends the small entries of the other rank, so ``w`` settles at a biased point;
    with feedback they accumulate until they are sent and ``w`` reaches the mean target.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_3d.collectives import CompressedCommState, CompressedReduceScatter

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=RANK, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    generator = torch.Generator().manual_seed(0)
    numel = 1 << 14
    targets = torch.randn(2, numel, generator=generator) * torch.logspace(1, -1, numel)
    mean_target = targets.mean(0)
    result: dict[str, Any] = {}
    for tag in ("dense", "feedback", "no_feedback"):
        model = Vector(numel)
        fully_shard(model, mesh=mesh)
        if tag != "dense":
            compressor = GradientCompressor(density=0.05, min_numel=0)
            state = CompressedCommState(compressor, error_feedback=tag == "feedback")
            model.set_custom_reduce_scatter(CompressedReduceScatter(state, "vector"))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(200):
            optimizer.zero_grad()
            (0.5 * (model() - targets[RANK]).pow(2).sum()).backward()
            optimizer.step()
        weight = model.weight.full_tensor().detach()
        result[f"error_{tag}"] = float((weight - mean_target).norm() / mean_target.norm())
    return result


def reduce_ops(out: Path) -> dict[str, Any]:
    """Our reduce-scatter against FSDP2's own on odd shapes (uneven padding): sent dense, for the
    default average, fp16 reduction (pre/post divide around a SUM) and a gradient divide factor
    (PREMUL_SUM, which gloo itself refuses: compared with the average rescaled by hand); then
    compressed, the divide factor again, and a NaN on rank 1 reaching both ranks' shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lightning_3d.collectives import CompressedCommState, CompressedReduceScatter

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=RANK, world_size=RANKS)
    mesh = init_device_mesh("cpu", (RANKS,))
    nonfinite_messages = []

    def gradients(
        ours: bool,
        reduce_dtype: torch.dtype | None = None,
        factor: float | None = None,
        compressing: bool = False,
        poison: bool = False,
    ) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
        compressor = GradientCompressor(density=0.5, block_size=8, min_numel=0)
        state = CompressedCommState(compressor, warmup_steps=0 if compressing else 10**6)
        for index, layer in enumerate(model):
            fully_shard(layer, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=reduce_dtype))
            if ours:
                layer.set_custom_reduce_scatter(CompressedReduceScatter(state, str(index)))
            if factor is not None:
                layer.set_gradient_divide_factor(factor)
        x = torch.randn(4, 7, generator=torch.Generator().manual_seed(RANK))
        if poison and RANK == 1:
            x[0, 0] = float("nan")
        model(x).pow(2).sum().backward()
        nonfinite_messages.append(state.take_stats().nonfinite)
        return [p.grad.to_local().clone() for p in model.parameters()]

    def difference(a: list, b: list) -> float:  # an empty shard (4 ranks, 3 rows) differs by 0
        return max(
            float((x - y).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b, strict=True)
        )

    average = gradients(False)
    compressed = gradients(True, compressing=True)
    poisoned = gradients(True, compressing=True, poison=True)
    return {
        "largest_gradient": max((float(g.abs().max()) for g in average if g.numel()), default=0.0),
        "difference_avg": difference(gradients(True), average),
        "difference_fp16_reduce": difference(
            gradients(True, torch.float16), gradients(False, torch.float16)
        ),
        "difference_divide_factor": difference(
            gradients(True, factor=3.0), [g * RANKS / 3 for g in average]
        ),
        "compressed_vs_average": difference(compressed, average),
        "difference_divide_factor_compressed": difference(
            gradients(True, factor=3.0, compressing=True), [g * RANKS / 3 for g in compressed]
        ),
        "poisoned_all_nan": all(bool(g.isnan().all()) for g in poisoned),
        "shard_rows": [g.shape[0] if g.dim() else 1 for g in average],
        "poisoned_nonfinite_messages": nonfinite_messages[2],
    }


def all_gather(out: Path) -> dict[str, Any]:
    """Parameters all-gathered as bf16 and int8 through ``CompressedAllGather``: what every rank
    computes with, against independent expectations; then a compressed-both-ways fit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_3d.collectives import CompressedAllGather, CompressedCommState

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=RANK, world_size=RANKS)
    mesh = init_device_mesh("cpu", (RANKS,))
    result: dict[str, Any] = {}
    for value_format in ("bf16", "int8", "int4_delta"):
        torch.manual_seed(0)  # the same full weights on every rank, known here without a gather
        model = torch.nn.Sequential(torch.nn.Linear(16, 12, bias=False), torch.nn.Linear(12, 5))
        full = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = CompressedCommState(GradientCompressor())
        for index, layer in enumerate(model):
            fully_shard(layer, mesh=mesh)
            layer.set_custom_all_gather(CompressedAllGather(state, str(index), value_format, 8))
        gathered = gather_all(model)
        masters = own_shards(dict(model.named_parameters()))
        stats = state.take_stats()
        weight = full["0.weight"]  # 12 rows: whole, equal shards on 2, 3 and 4 ranks
        if value_format == "bf16":
            expected = weight.to(torch.bfloat16).float()
        else:  # each rank's shard alone in its unit, int8 first: blocks of 8 over the shard
            expected = blockwise(weight, 127)
        bias_scale = full["1.bias"].abs().max()
        uneven_entries = torch.cat([full["1.weight"].flatten(), full["1.bias"]])
        result[value_format] = {
            "whole_vs_expected": float((gathered["0.weight"] - expected).abs().max()),
            "changed": bool((gathered["0.weight"] != weight).any()),
            "uneven_error": float((gathered["1.weight"] - full["1.weight"]).abs().max()),
            # a block may hold weight and bias entries: the larger of the two sets its scale
            "uneven_bound": float(uneven_entries.abs().max()) / 127.0,
            "bias_error": float((gathered["1.bias"] - full["1.bias"]).abs().max() / bias_scale),
            "masters_exact": all(torch.equal(masters[n], expected_shard(full[n])) for n in full),
            "spread": rank_spread(gathered),
            "wire_bytes": stats.all_gather_wire_bytes,
            "dense_bytes": stats.all_gather_dense_bytes,
        }
        if value_format == "int4_delta":
            result[value_format]["delta"] = delta_gathers(model, full, expected, state)
    result["int4_delta_bf16"] = bf16_delta_gathers(mesh)
    _, result["losses_dense_fsdp"] = fit(CompressedFSDPStrategy(compress=False))
    for value_format in ("int8", "int4_delta"):
        both_ways = CompressedFSDPStrategy(all_gather=value_format)
        task, result[f"losses_both_ways_{value_format}"] = fit(both_ways)
        totals = both_ways.comm_totals
        seen = task.trainer.callback_metrics  # no logger in this fit: the strategy still reports
        result[f"both_ways_{value_format}"] = {
            "all_gather_ratio": totals.all_gather_dense_bytes / totals.all_gather_wire_bytes,
            "gradient_ratio": totals.dense_bytes / totals.wire_bytes,
            "overall_ratio": (totals.dense_bytes + totals.all_gather_dense_bytes)
            / (totals.wire_bytes + totals.all_gather_wire_bytes),
            "callback_metrics": {k: float(v) for k, v in seen.items() if k.startswith("comm/")},
            "steps": task.trainer.global_step,
        }
    return result


def gather_all(model: torch.nn.Sequential) -> dict[str, torch.Tensor]:
    """What every layer's parameters are after one all-gather (unshard, copy, reshard)."""
    gathered = {}
    for index, layer in enumerate(model):
        layer.unshard()
        for name, param in layer.named_parameters():
            gathered[f"{index}.{name}"] = param.detach().clone()
        layer.reshard()
    return gathered


def blockwise(full: torch.Tensor, levels: int) -> torch.Tensor:
    """``full`` as every rank decodes it when each rank's row shard is quantized on its own in
    blocks of 8 with ``levels`` levels (written out here, independently of the library)."""
    decoded = []
    for shard in full.chunk(RANKS):
        blocks = shard.reshape(-1, 8)
        scale = blocks.abs().amax(dim=1, keepdim=True) / levels
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        decoded.append((torch.round(blocks / safe).clamp(-levels, levels) * scale).view(-1))
    return torch.cat(decoded).view_as(full)


def bf16_delta_gathers(mesh: Any) -> dict[str, Any]:
    """int4_delta under a bf16 ``param_dtype``: the copy is kept in bf16; the second gather
    brings the weights from int8's error to bf16's rounding, the same on every rank."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lightning_3d.collectives import CompressedAllGather, CompressedCommState

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12, bias=False), torch.nn.Linear(12, 5))
    full = model[0].weight.detach().clone()
    state = CompressedCommState(GradientCompressor())
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for index, layer in enumerate(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
        layer.set_custom_all_gather(CompressedAllGather(state, str(index), "int4_delta", 8))
    first, second = gather_all(model)["0.weight"], gather_all(model)["0.weight"]
    rounded = full.to(torch.bfloat16).float()
    return {
        "dtype": str(second.dtype),
        "first_error": float((first.float() - rounded).abs().max()),
        "second_error": float((second.float() - rounded).abs().max()),
        "bf16_step": float(full.abs().max()) * 2**-8,  # bf16 keeps 8 significant bits
        "spread": rank_spread({"second": second.float()}),
    }


def delta_gathers(
    model: torch.nn.Sequential, full: dict[str, torch.Tensor], first: torch.Tensor, state: Any
) -> dict[str, Any]:
    """int4_delta after the first (int8) gather: the masters move by a known step, the next
    gather sends 4-bit differences to the int8 copy, and one more gather without a change
    refines what the last one left."""
    step = torch.randn(full["0.weight"].shape, generator=torch.Generator().manual_seed(1)) * 1e-2
    with torch.no_grad():
        model[0].weight.to_local().add_(expected_shard(step))
    moved = full["0.weight"] + step
    second = gather_all(model)["0.weight"]
    expected = first + blockwise(moved - first, 7)
    third = gather_all(model)["0.weight"]
    stats = state.take_stats()
    left = (moved - second).abs().reshape(-1, 8).amax(dim=1)
    refined = (moved - third).abs().reshape(-1, 8).amax(dim=1)
    return {
        "second_vs_expected": float((second - expected).abs().max()),
        "second_error": float((second - moved).abs().max()),
        "int8_error": float((first - moved).abs().max()),
        # the third gather's error, per block, against what the second left over 14
        "refined_over_bound": float((refined / (left / 14).clamp_min(1e-12)).max()),
        "spread": rank_spread({"second": second, "third": third}),
        "masters_exact": torch.equal(
            own_shards({"w": model[0].weight})["w"], expected_shard(moved)
        ),
        "wire_bytes": stats.all_gather_wire_bytes,
        "dense_bytes": stats.all_gather_dense_bytes,
    }


class SelfShardingModule(pl.LightningModule):
    """Applies fully_shard itself in configure_model: the strategy must keep that sharding."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.body, mesh=self.device_mesh["data_parallel"])  # one unit, not per layer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.body(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def own_sharding(out: Path) -> dict[str, Any]:
    from torch.distributed.fsdp import FSDPModule

    module = SelfShardingModule()
    data = torch.utils.data.TensorDataset(torch.randn(32, 64))
    strategy = CompressedFSDPStrategy(min_numel=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=4))
    units = [name for name, m in module.named_modules() if isinstance(m, FSDPModule)]
    # one compressed reduce-scatter per step: the module's single unit, and nothing else
    return {"units": units, "calls": strategy.comm_totals.calls}


class PartlyFrozen(pl.LightningModule):
    """A frozen base layer (as under LoRA) and a trainable one after it."""

    def configure_model(self) -> None:
        """Present, as model-parallel strategies require; the strategy shards the model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.base = torch.nn.Linear(64, 256)
        self.adapter = torch.nn.Linear(256, 64)
        self.base.requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.adapter(torch.tanh(self.base(batch[0]))).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def frozen_replicated(out: Path) -> dict[str, Any]:
    """Frozen parameters sharded (FSDP2's default) against kept whole on every rank."""
    result: dict[str, Any] = {}
    runs = {}
    for frozen in ("shard", "replicate"):
        module = PartlyFrozen()
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
        torch.manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.randn(8 * RANKS * 3, 64))
        strategy = CompressedFSDPStrategy(min_numel=0, frozen=frozen)
        trainer = pl.Trainer(
            accelerator="cpu", devices=RANKS, strategy=strategy, max_steps=3, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=8))
        result[f"{frozen}_sharded"] = sorted(
            n for n, p in module.named_parameters() if hasattr(p, "device_mesh")
        )
        runs[frozen] = full_parameters(module)
        result[f"{frozen}_base_moved"] = max(
            float((runs[frozen][n] - before[n]).abs().max()) for n in before if "base" in n
        )
        result[f"{frozen}_calls"] = strategy.comm_totals.calls
    result["replicate_vs_shard"] = max_difference(runs["replicate"], runs["shard"])
    result["adapter_moved"] = float(
        (runs["replicate"]["adapter.weight"] - PartlyFrozen().adapter.weight).abs().max()
    )
    return result


class StepTimes(Callback):
    """Wall time of every training step (the batch's forward, backward, collectives, update)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.seconds.append(time.perf_counter() - self._started)


def smollm2_lora(out: Path) -> dict[str, Any]:
    """The real SmolLM2 with LoRA adapters under the compressed FSDP2 strategy: the frozen base
    sharded (FSDP2's default), sharded with int8 all-gathers, or kept whole on every rank."""
    from lightning_3d.data import PromptDataset, RottenTomatoesPrompts
    from lightning_3d.tasks import LoRASettings, PromptClassificationTask

    result: dict[str, Any] = {}
    runs = {}
    for name, options in (
        ("shard", {"frozen": "shard"}),
        ("shard_int8", {"frozen": "shard", "all_gather": "int8"}),
        ("replicate", {"frozen": "replicate"}),
    ):
        pl.seed_everything(0)
        task = PromptClassificationTask(
            lora=LoRASettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
        )
        initial = {n: p.detach().clone() for n, p in task.named_parameters()}
        data = RottenTomatoesPrompts(tokenizer=task.tokenizer, max_length=40, batch_size=2)
        data.setup("fit")
        full = data.splits["train"]
        data.splits["train"] = PromptDataset(full.prompts[:8], full.answers, full.classes[:8])
        strategy = CompressedFSDPStrategy(**options)
        timer = StepTimes()
        trainer = pl.Trainer(
            accelerator="cpu", devices=RANKS, strategy=strategy, max_steps=3, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, callbacks=[timer],
        )  # fmt: skip
        trainer.fit(task, datamodule=data)
        params = dict(task.named_parameters())
        adapters = sorted(n for n, p in params.items() if p.requires_grad)
        result[f"{name}_adapters"] = len(adapters)
        result[f"{name}_sharded_base"] = sum(
            hasattr(p, "device_mesh") for n, p in params.items() if not p.requires_grad
        )
        result[f"{name}_sharded_adapters"] = sum(
            hasattr(params[n], "device_mesh") for n in adapters
        )
        runs[name] = full_parameters(task)
        result[f"{name}_base_moved"] = max(
            float((runs[name][n] - initial[n]).abs().max()) for n in initial if n not in adapters
        )
        result[f"{name}_adapters_moved"] = max(
            float((runs[name][n] - initial[n]).abs().max()) for n in adapters
        )
        totals = strategy.comm_totals
        result[f"{name}_reduce_scatter_dense_bytes"] = totals.dense_bytes
        result[f"{name}_reduce_scatter_wire_bytes"] = totals.wire_bytes
        result[f"{name}_all_gather_wire_bytes"] = totals.all_gather_wire_bytes
        result[f"{name}_all_gather_dense_bytes"] = totals.all_gather_dense_bytes
        result[f"{name}_step_s"] = sorted(timer.seconds[1:])[len(timer.seconds[1:]) // 2]
        result["adapter_bytes"] = 4 * sum(params[n].numel() for n in adapters)
        # FSDP2 pads each tensor's first dimension to a multiple of the ranks before it splits
        result["padded_adapter_bytes"] = 4 * sum(
            -(-params[n].shape[0] // RANKS) * RANKS * math.prod(params[n].shape[1:])
            for n in adapters
        )
        result["base_bytes"] = 4 * sum(p.numel() for n, p in params.items() if n not in adapters)
        del task, trainer, strategy
    adapters = [n for n in runs["shard"] if "lora_" in n]
    result["replicate_vs_shard"] = max_difference(
        {n: runs["replicate"][n] for n in adapters}, {n: runs["shard"][n] for n in adapters}
    )
    result["int8_vs_shard"] = max_difference(
        {n: runs["shard_int8"][n] for n in adapters}, {n: runs["shard"][n] for n in adapters}
    )
    return result


class DyingModule(pl.LightningModule):
    def configure_model(self) -> None:
        """Present, as model-parallel strategies require; the strategy shards the model."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if RANK == 1 and batch_idx == 2:
            os._exit(3)
        return self.body(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def die(out: Path) -> dict[str, Any]:
    from datetime import timedelta

    data = torch.utils.data.TensorDataset(torch.randn(64, 64))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=CompressedFSDPStrategy(min_numel=0, timeout=timedelta(seconds=60)),
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DyingModule(), train_dataloaders=DataLoader(data, batch_size=4))
    return {"finished": True}


class IndexedPoints(torch.utils.data.Dataset):
    """60 fixed points (the same on both ranks) labelled by their first coordinate's sign."""

    def __init__(self) -> None:
        self.x = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"x": self.x[i], "labels": int(self.x[i, 0] > 0), "index": i}
        return item | {"text": "w" * GROUPED_LENGTHS[i]}  # lengths for group_by_length


#: Lengths of the points' ``"text"`` (what ``group_by_length`` sorts by), fixed and uneven.
GROUPED_LENGTHS = torch.randint(1, 40, (60,), generator=torch.Generator().manual_seed(1)).tolist()


class CurriculumModule(pl.LightningModule):
    def configure_model(self) -> None:
        """Present, as model-parallel strategies require; the strategy shards the model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)
        )
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        losses = torch.nn.functional.cross_entropy(
            self.net(batch["x"]), batch["labels"], reduction="none"
        )
        self.seen.setdefault(self.current_epoch, []).extend(batch["index"].tolist())
        return {"loss": losses.mean(), "per_sample_loss": losses.detach(), "index": batch["index"]}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class PlanRecorder(Callback):
    def __init__(self, curriculum: Any) -> None:
        self.curriculum = curriculum
        self.plans: dict[int, list[int]] = {}

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        self.plans[trainer.current_epoch] = self.curriculum.current_plan().order.tolist()


def fit_curriculum(sampler: Any, strategy: Any) -> tuple[CurriculumModule, PlanRecorder, Any]:
    """3 epochs of :class:`CurriculumModule` over the points, 4 a batch, through ``sampler``."""
    plans, module = PlanRecorder(sampler), CurriculumModule()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=RANKS,
        strategy=strategy,
        max_epochs=3,
        callbacks=[sampler, plans],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(IndexedPoints(), batch_size=4, shuffle=True)
    trainer.fit(module, train_dataloaders=sampler.wrap_train_dataloader(loader))
    return module, plans, trainer


def curriculum(out: Path) -> dict[str, Any]:
    from lightning_3d.callbacks import CurriculumSampler

    result: dict[str, Any] = {}
    for name, strategy, gather_every in (
        ("ddp", DDPStrategy(process_group_backend="gloo"), 32),  # gathers at epoch ends only
        ("ddp_gather_every_batch", DDPStrategy(process_group_backend="gloo"), 1),
        ("ddp_gather_every_3", DDPStrategy(process_group_backend="gloo"), 3),
        ("fsdp_compressed", CompressedFSDPStrategy(min_numel=0), 32),
    ):
        sampler = CurriculumSampler(
            pacing="linear", start_fraction=0.4, full_at=1.0, budget=0.8, gather_every=gather_every
        )
        module, plans, trainer = fit_curriculum(sampler, strategy)
        result[name] = {
            "seen": module.seen,
            "plans": plans.plans,
            "scores": sampler.scores.tolist(),
            "steps": trainer.global_step,
        }
    # batches of similar length: every epoch on all data (warm-up), so the test can rebuild the
    # plan from the seed; each global batch is 4 items a rank
    sampler = CurriculumSampler(warmup_epochs=3, group_by_length=2, length_key="text", seed=5)
    module, plans, _ = fit_curriculum(sampler, DDPStrategy(process_group_backend="gloo"))
    result["ddp_grouped"] = {"seen": module.seen, "plans": plans.plans, "lengths": GROUPED_LENGTHS}
    return result


class Snapshot(Callback):
    """Full copies of the parameters right after the freezer acted at ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.params: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.params = full_parameters(module)


def freezer(out: Path) -> dict[str, Any]:
    from lightning_3d.callbacks import SensitivityFreezer

    result: dict[str, Any] = {}
    for name, strategy in (
        ("ddp", DDPStrategy(process_group_backend="gloo")),
        ("fsdp", CompressedFSDPStrategy(compress=False)),
        ("fsdp_compressed", CompressedFSDPStrategy(density=0.15)),
    ):
        sensitivity = SensitivityFreezer(target_trainable=0.1, warmup_steps=2)
        snapshot = Snapshot(step=2)
        task, _ = fit(strategy, callbacks=[sensitivity, snapshot])
        final = full_parameters(task)
        if name == "ddp":
            ddp_final = final  # the independent expectation for every FSDP2 rank's own shards
        optimizer = task.trainer.optimizers[0]
        in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
        names = {id(p): n for n, p in task.named_parameters()}
        result[name] = {
            "frozen": sorted(sensitivity.frozen),
            "fisher": sensitivity.statistics.tensor_metric("fisher"),
            "trainable_fraction": sensitivity.trainable_fraction,
            "frozen_moved": max(
                float((final[n] - snapshot.params[n]).abs().max()) for n in sensitivity.frozen
            ),
            "trainable_moved": min(
                float((final[n] - snapshot.params[n]).abs().max())
                for n in snapshot.params
                if n not in sensitivity.frozen
            ),
            # DDP: every replica equals rank 0's; FSDP2: every rank's own shard equals its part
            # of the DDP model (a gathered tensor compared across ranks could not differ)
            "rank_spread": rank_spread(final) if name == "ddp" else None,
            "shard_vs_ddp": None if name == "ddp" else shard_difference(task, ddp_final),
            "optimizer_params": sorted(names[i] for i in in_groups),
            "state_params": sorted(names[id(p)] for p in optimizer.state),
            "requires_grad": sorted(n for n, p in task.named_parameters() if p.requires_grad),
            "steps": task.trainer.global_step,
        }
    return result


def whole_and_resumed(make: Any, out: Path, name: str) -> tuple[Any, Any, Any, Any]:
    """Under FSDP2: a run with the callback ``make()``, and one checkpointed (sharded) and
    stopped after 3 steps, then resumed with a fresh ``make()``; returns (whole task, its
    callback, resumed task, its callback)."""
    whole_callback, resumed_callback = make(), make()
    whole, _ = fit(CompressedFSDPStrategy(compress=False), callbacks=[whole_callback])
    folder = out / f"{name}_checkpoints"
    checkpoint = ModelCheckpoint(dirpath=folder, filename="first", every_n_train_steps=3)
    fit(CompressedFSDPStrategy(compress=False), stop_at_step=3, callbacks=[make(), checkpoint])
    resumed, _ = fit(
        CompressedFSDPStrategy(compress=False),
        ckpt_path=str(folder / "first.ckpt"),
        callbacks=[resumed_callback],
    )
    return whole, whole_callback, resumed, resumed_callback


def freezer_resume(out: Path) -> dict[str, Any]:
    from lightning_3d.callbacks import SensitivityFreezer

    def freezer() -> SensitivityFreezer:
        return SensitivityFreezer(target_trainable=0.1, warmup_steps=2)

    whole, whole_freezer, resumed, resumed_freezer = whole_and_resumed(freezer, out, "freezer")
    return {
        "difference": max_difference(full_parameters(whole), full_parameters(resumed)),
        "frozen_whole": sorted(whole_freezer.frozen),
        "frozen_resumed": sorted(resumed_freezer.frozen),
        "steps": resumed.trainer.global_step,
    }


def freezer_composite_resume(out: Path) -> dict[str, Any]:
    """A progressive composite freezer (its theta_0 reference copies in the checkpoint, sharded)
    stopped between its two events and resumed."""
    from lightning_3d.callbacks import SensitivityFreezer
    from lightning_3d.sharding import SHARDED_REF

    def freezer() -> SensitivityFreezer:
        return SensitivityFreezer(
            target_trainable=0.2, metric="composite", warmup_steps=2, schedule="progressive",
            stages=2, interval=2,
        )  # fmt: skip

    whole, whole_freezer, resumed, resumed_freezer = whole_and_resumed(
        freezer, out, "freezer_composite"
    )
    meta = torch.load(out / "freezer_composite_checkpoints" / "first.ckpt" / "meta.pt",
                      weights_only=False)  # fmt: skip
    references = meta["callbacks"]["SensitivityFreezer"]["reference"]
    return {
        "difference": max_difference(full_parameters(whole), full_parameters(resumed)),
        "frozen_whole": sorted(whole_freezer.frozen),
        "frozen_resumed": sorted(resumed_freezer.frozen),
        "references": len(references),
        "references_sharded": all(SHARDED_REF in r for r in references.values()),
        "steps": resumed.trainer.global_step,
    }


def pruner_masks(pruner: Any) -> dict[str, torch.Tensor]:
    from lightning_3d.sharding import full_copy

    return {n: full_copy(m) for n, m in pruner.masks.items()}  # a collective under FSDP2


def pruner(out: Path) -> dict[str, Any]:
    import hashlib

    from lightning_3d.callbacks import ProgressivePruner
    from lightning_3d.pruning import mask_sparsity

    result: dict[str, Any] = {}
    for name, strategy in (
        ("ddp", DDPStrategy(process_group_backend="gloo")),
        ("fsdp", CompressedFSDPStrategy(compress=False)),
    ):
        pruning = ProgressivePruner(0.5, score="movement", start_step=2, end_step=4, frequency=2)
        task, _ = fit(strategy, callbacks=[pruning])
        own_masks = own_shards(pruning.masks)  # before any gather: what this rank applies
        own_params = own_shards(dict(task.named_parameters()))
        params, masks = full_parameters(task), pruner_masks(pruning)
        result[name] = {
            "masks": {n: hashlib.sha1(m.numpy().tobytes()).hexdigest() for n, m in masks.items()},
            "sparsity": mask_sparsity(masks),
            # each rank's own shard is zero where its own mask shard prunes
            "own_pruned_nonzero": sum(
                int(own_params[n][~m].count_nonzero()) for n, m in own_masks.items()
            ),
        }
        if name == "ddp":
            ddp_masks = masks
            result[name]["rank_spread"] = rank_spread(params)  # replicas: rank 0's model
        else:  # each rank's own mask shard against its part of the DDP run's masks
            disagree = sum(
                int((m != expected_shard(ddp_masks[n])).sum()) for n, m in own_masks.items()
            )
            result[name]["mask_disagreement"] = disagree / sum(
                m.numel() for m in own_masks.values()
            )
    return result


def pruner_resume(out: Path) -> dict[str, Any]:
    from lightning_3d.callbacks import ProgressivePruner

    def pruner() -> ProgressivePruner:
        return ProgressivePruner(0.5, score="movement", start_step=2, end_step=5, frequency=1)

    whole, whole_pruner, resumed, resumed_pruner = whole_and_resumed(pruner, out, "pruner")
    whole_masks, resumed_masks = pruner_masks(whole_pruner), pruner_masks(resumed_pruner)
    return {
        "difference": max_difference(full_parameters(whole), full_parameters(resumed)),
        "masks_equal": all(torch.equal(whole_masks[n], resumed_masks[n]) for n in whole_masks),
        "steps": resumed.trainer.global_step,
    }


def pruner_checkpoint(out: Path) -> dict[str, Any]:
    """The sharded checkpoint pruner_resume wrote (run it first): where the masks went."""
    import torch.distributed.checkpoint as dcp

    from lightning_3d.sharding import SHARDED_REF

    folder = out / "pruner_checkpoints" / "first.ckpt"
    meta = torch.load(folder / "meta.pt", weights_only=False)
    masks = meta["callbacks"]["ProgressivePruner"]["masks"]
    saved = dcp.FileSystemReader(folder / "callback_tensors").read_metadata()
    return {
        "masks_are_references": all(SHARDED_REF in m for m in masks.values()),
        "references": sorted(m[SHARDED_REF] for m in masks.values()),
        "saved": sorted(saved.state_dict_metadata),
        "shapes": {m[SHARDED_REF]: m["shape"] for m in masks.values()},
        "meta_tensors": sum(torch.is_tensor(m) for m in masks.values()),
    }


class PlanWatcher(Callback):
    """What the whole plan did on this rank: the samples each step distilled from and, at the
    end of training (before QAT conversion), full copies of the parameters and the masks."""

    def __init__(self) -> None:
        self.distilled: set[int] = set()
        self.params: dict[str, torch.Tensor] = {}
        self.teacher_steps: list[int] = []

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, idx: int) -> None:
        from lightning_3d.distillation import TEACHER_KEY

        targets = batch.get(TEACHER_KEY)
        if targets is not None:
            rows = batch["index"] if targets.present is None else batch["index"][targets.present]
            self.distilled.update(rows.tolist())
            self.teacher_steps.append(trainer.global_step)

    def on_train_end(self, trainer: Any, module: Any) -> None:
        self.params = full_parameters(module)


def plan(out: Path) -> dict[str, Any]:
    """The whole co-optimization plan (data, distillation, parameters, heads+neurons, int8 QAT)
    on the real MiniLM under DDP: 3 epochs of 48 reviews (all data, then 70% of them)."""
    from lightning_3d.callbacks import (
        CurriculumSampler,
        Distiller,
        PlanCoordinator,
        ProgressivePruner,
        QATHook,
        SensitivityFreezer,
    )
    from lightning_3d.plan import ThreeDPlan

    settings = ThreeDPlan(
        data_budget=0.7, trainable=0.5, sparsity=0.3, prune_pattern="heads+neurons",
        weight_bits=8, distill=0.5, warmup=0.25, prune_end=0.6, qat_start=0.8,
    )  # fmt: skip
    watcher = PlanWatcher()
    task = make_task()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=RANKS,
        strategy=DDPStrategy(process_group_backend="gloo"),
        max_epochs=3,
        callbacks=[*settings.callbacks(), watcher],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(task, train_dataloaders=with_curriculum(trainer, make_loader(task)))

    def find(kind: type) -> Any:
        return next(c for c in trainer.callbacks if isinstance(c, kind))

    coordinator, curriculum = find(PlanCoordinator), find(CurriculumSampler)
    distiller, freezer = find(Distiller), find(SensitivityFreezer)
    pruner, qat = find(ProgressivePruner), find(QATHook)
    masks = {n: m.to(torch.uint8) for n, m in pruner.masks.items()}
    return {
        "steps": trainer.global_step,
        "total_steps": coordinator.total_steps,
        "phases": [
            freezer.warmup_steps,
            distiller.start_step,
            pruner.start_step,
            pruner.window_end,
            qat.start_step,
        ],
        "frozen": sorted(freezer.frozen),
        "pruned_targets": sorted(pruner.targets),
        "achieved_sparsity": pruner.achieved_sparsity,
        "masks": {n: m.flatten().tolist() for n, m in masks.items()},
        "mask_spread": rank_spread({n: m.float() for n, m in masks.items()}),
        "rank_spread": rank_spread(watcher.params),
        "scores": curriculum.scores.tolist(),
        "distilled": sorted(watcher.distilled),
        "teacher_steps": watcher.teacher_steps,
        "teacher_samples": distiller.teacher_samples,
        "cached": distiller.cache.samples,
        "released": distiller.released,
        "qat_stage": qat.stage,
    }


class RankReviews(pl.LightningDataModule):
    """Each rank's own training batches: the rank's slice of 48 real reviews (different words on
    every rank), in order."""

    def __init__(self, task: Any) -> None:
        super().__init__()
        from lightning_3d.data import PaddingCollator

        own = range(RANK * 2 * BATCH, (RANK + 1) * 2 * BATCH)
        self.dataset = Subset(training_split(task.tokenizer), own)
        self.collate = PaddingCollator(int(task.tokenizer.pad_token_id))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=BATCH, collate_fn=self.collate)


def two_ddp_steps(task: Any, data: pl.LightningDataModule, callback: Callback) -> None:
    """Fit ``task`` for 2 steps under DDP (gloo) on every rank with ``callback``."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=RANKS,
        strategy=DDPStrategy(process_group_backend="gloo"),
        max_steps=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(task, datamodule=data)


def vocabulary(out: Path) -> dict[str, Any]:
    """VocabularyTrimmer under DDP with different training reviews on every rank: the ids each
    rank saw, the ids kept, and the ranks' parameter spread after 2 steps."""
    from lightning_3d.callbacks import VocabularyTrimmer

    task = make_task()
    data = RankReviews(task)
    seen = sorted(
        {int(i) for batch in data.train_dataloader() for i in batch["input_ids"].flatten()}
    )
    two_ddp_steps(task, data, VocabularyTrimmer())
    embedding = task.model.get_input_embeddings()
    rows = embedding.token_rows
    unknown = int(task.tokenizer.unk_token_id)
    kept = sorted({int(i) for i in torch.nonzero(rows != rows[unknown]).flatten()} | {unknown})
    return {
        "seen": seen,
        "kept": kept,
        "special": sorted(task.tokenizer.all_special_ids),
        "rank_spread": rank_spread(full_parameters(task)),
    }


def depth(out: Path) -> dict[str, Any]:
    """DepthPruner (1 of the 2 blocks) under DDP with different training reviews on every
    rank: this rank's own influence sums and tokens on its first 2 batches, the blocks removed,
    and the ranks' parameter spread after 2 steps."""
    import copy

    from lightning_3d.callbacks import DepthPruner
    from lightning_3d.depth import block_influence

    task = make_task()
    data = RankReviews(task)
    batches = list(data.train_dataloader())[:2]
    sums, tokens = block_influence(copy.deepcopy(task.model), batches)
    pruner = DepthPruner(blocks=1, batches=2)
    two_ddp_steps(task, data, pruner)
    return {
        "sums": sums.tolist(),
        "tokens": float(tokens),
        "removed": pruner.removed,
        "blocks": len(task.model.bert.encoder.layer),
        "rank_spread": rank_spread(full_parameters(task)),
    }


def abort_once(out: Path) -> dict[str, Any]:
    """Rank 0 aborts natively (SIGABRT, as a glibc heap check does) the first time the job runs
    in ``OUT``; a marker beside ``OUT`` lets the launcher's second attempt finish."""
    marker = out.with_name(out.name + ".aborted")
    if RANK == 0 and not marker.exists():
        marker.write_text("")
        os.abort()
    return {"rank": RANK}


SCENARIOS = {
    "abort_once": abort_once,
    "parity": parity,
    "resume": resume,
    "ddp": ddp,
    "feedback": feedback,
    "reduce_ops": reduce_ops,
    "all_gather": all_gather,
    "own_sharding": own_sharding,
    "frozen_replicated": frozen_replicated,
    "smollm2_lora": smollm2_lora,
    "die": die,
    "curriculum": curriculum,
    "freezer": freezer,
    "freezer_resume": freezer_resume,
    "freezer_composite_resume": freezer_composite_resume,
    "pruner": pruner,
    "pruner_resume": pruner_resume,
    "pruner_checkpoint": pruner_checkpoint,
    "sharded_checkpoint": sharded_checkpoint,
    "plan": plan,
    "vocabulary": vocabulary,
    "depth": depth,
}


def main() -> None:
    names, out = sys.argv[1].split(","), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        result = SCENARIOS[name](out)
        (out / f"{name}.rank{RANK}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # a live gloo group can abort the interpreter at exit


if __name__ == "__main__":
    main()
