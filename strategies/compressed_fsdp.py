"""``CompressedFSDPStrategy``: FSDP2 whose gradient reduce-scatter is compressed with feedback."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    FullyShardedDataParallel,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from lightning_3d.checkpoints import before_strategy_load
from lightning_3d.collectives import (
    ALL_GATHER_FORMATS,
    GATHERABLE_DTYPES,
    CompressedAllGather,
    CompressedCommState,
    CompressedReduceScatter,
    Exchange,
    own_parameters,
)
from lightning_3d.sharding import (
    gather_sharded,
    join_sharded,
    shard_targets,
    sharded_templates,
    split_sharded,
)
from lightning_3d.strategies._compressed import (
    STATE_KEY,
    CheckpointPath,
    CompressionStrategyMixin,
    load_options,
    make_compressor,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: What the strategy does with parameters that do not require gradients (``frozen=``).
FROZEN_POLICIES = ("shard", "replicate")


def _dtype(name: str | None, argument: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"{argument} must be one of {sorted(_DTYPES)} or None, got {name!r}")
    return _DTYPES[name]


#: The folder of a sharded checkpoint that holds the callbacks' sharded tensors.
CALLBACK_TENSORS = "callback_tensors"


def _state_file(directory: Path, rank: int) -> Path:
    return directory / f"compression_state.rank{rank}.pt"


class CompressedFSDPStrategy(CompressionStrategyMixin, ModelParallelStrategy):
    """FSDP2 data parallelism with a compressed gradient reduce-scatter (``"fsdp_compressed"``).

    Each FSDP unit's gradients are reduce-scattered by
    :class:`~lightning_3d.collectives.CompressedReduceScatter`: every rank compresses the chunk
    for each other rank (top-``density`` entries, 8-bit values with one scale per block, bitmap
    positions) with its own error-feedback residual, the slots cross in one ``all_to_all`` and the
    receiver decodes and sums in fp32. ``SUM``, ``AVG`` and FSDP's divide factors are honoured.

    Sharding: if the LightningModule's ``configure_model`` applies ``fully_shard`` itself, that
    wins; otherwise the strategy shards by :func:`~lightning_3d.sharding.shard_targets`
    (transformer blocks by default, or ``shard_modules`` class names and/or ``min_num_params``).

    Args:
        density: fraction of each chunk sent, in (0, 1].
        value_format: ``"int8"`` or ``"fp8_e4m3"``.
        block_size: entries per quantization scale (a power of two in [8, 65536]).
        selection: ``"exact"`` top-k or ``"sampled"`` threshold estimation.
        warmup_steps: optimizer steps sent dense before compression starts.
        min_numel: chunks smaller than this are sent dense.
        residual_dtype: ``"float32"`` or ``"bfloat16"``.
        error_feedback: carry what was not sent into the next step (keep on; off only to measure).
        exchange: ``"auto"``, ``"all_to_all"`` or ``"all_gather"``.
        nonfinite: when a gradient holds NaN/Inf: ``"propagate"`` (the receivers get NaN, as
            with FSDP2's own reduce-scatter) or ``"skip"`` (send zeros and count it); the
            residual is never touched.
        compress: ``False`` keeps FSDP2's own reduce-scatter (same sharding; a baseline).
        all_gather: how parameters travel in FSDP2's all-gathers (twice a step by default):
            ``"none"`` (FSDP2's own, in the parameter dtype), ``"bf16"``, ``"int8"`` (one fp32
            scale per ``block_size`` entries, as DeepSpeed's qwZ) or ``"int4_delta"`` (4-bit
            differences to the copy the last gather left on every rank, as SDP4Bit: half of
            int8's bytes, no accumulating error, for the memory of one unsharded copy per rank
            in the gathered dtype; :class:`~lightning_3d.collectives.CompressedAllGather`).
            Every rank computes with the same decoded weights, its own shard included; the fp32
            master shards the optimizer updates are untouched.
        frozen: what happens to parameters that do not require gradients when the strategy
            shards (a LoRA base, a frozen backbone): ``"shard"`` (FSDP2's default: sharded and
            all-gathered like the rest, in ``all_gather``'s format) or ``"replicate"`` (kept
            whole on every rank, outside FSDP: no all-gather ever carries them, at the memory of
            a full copy per rank). Either way only trainable gradients are reduce-scattered.
        shard_modules: class names to shard as units (default: the transformer blocks).
        min_num_params: also shard every module with this many parameters not yet in a unit.
        param_dtype, reduce_dtype: FSDP2 mixed precision (``"bfloat16"``, ``"float16"``,
            ``"float32"`` or ``None``).
        cpu_offload: keep sharded parameters, gradients and optimizer state on the CPU.
        reshard_after_forward: free gathered parameters after forward (FSDP2's default).
        save_distributed_checkpoint: one file per rank (default) or one full file on rank 0.
        process_group_backend, timeout: as Lightning's ``ModelParallelStrategy``; a rank that dies
            makes the others fail at their next collective, or after ``timeout`` at the latest.

    As with ``ModelParallelStrategy``, the LightningModule needs a ``configure_model()`` hook
    (an empty one is enough: the strategy then shards the model itself).

    Example::

        trainer = Trainer(strategy=CompressedFSDPStrategy(density=0.1), devices=8)
        trainer = Trainer(strategy="fsdp_compressed", devices=8)  # the defaults, by name
    """

    strategy_name = "fsdp_compressed"

    def __init__(
        self,
        density: float = 0.15,
        value_format: str = "int8",
        block_size: int = 256,
        selection: str = "exact",
        warmup_steps: int = 0,
        min_numel: int = 4096,
        residual_dtype: str = "float32",
        error_feedback: bool = True,
        exchange: Exchange = "auto",
        nonfinite: str = "propagate",
        compress: bool = True,
        all_gather: str = "none",
        frozen: str = "shard",
        shard_modules: list[str] | None = None,
        min_num_params: int | None = None,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        self._sharded_checkpoints = save_distributed_checkpoint
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        compressor = make_compressor(
            density, value_format, block_size, selection, min_numel, nonfinite
        )
        self.comm_state = CompressedCommState(
            compressor, warmup_steps, error_feedback, residual_dtype, exchange
        )
        if all_gather not in ALL_GATHER_FORMATS:
            raise ValueError(f"all_gather must be one of {ALL_GATHER_FORMATS}, got {all_gather!r}")
        self.all_gather_format = all_gather
        self._gatherers: list[CompressedAllGather] = []
        if frozen not in FROZEN_POLICIES:
            raise ValueError(f"frozen must be one of {FROZEN_POLICIES}, got {frozen!r}")
        self.frozen = frozen
        if min_num_params is not None and min_num_params <= 0:
            raise ValueError(f"min_num_params must be positive, got {min_num_params}")
        self.compress = compress
        self.shard_modules = shard_modules
        self.min_num_params = min_num_params
        self.mp_policy = MixedPrecisionPolicy(
            param_dtype=_dtype(param_dtype, "param_dtype"),
            reduce_dtype=_dtype(reduce_dtype, "reduce_dtype"),
        )
        self.offload_policy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
        self.reshard_after_forward = reshard_after_forward
        self._init_comm_metrics()

    @property
    def save_distributed_checkpoint(self) -> bool:
        """Whether checkpoints are sharded folders (set at construction only)."""
        return self._sharded_checkpoints

    # ---------------------------------------------------------------- set-up
    def setup_environment(self) -> None:
        # Pure data parallelism: one mesh dimension of every rank. ModelParallelStrategy takes
        # the sizes only in its constructor, before the world size is known, so they are set
        # here, on its private attributes (tests/test_lightning_seams.py names them).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def setup(self, trainer: pl.Trainer) -> None:
        """Shard the model (unless ``configure_model`` did), install the compressed collectives,
        then let ``ModelParallelStrategy.setup`` materialize it and set up the optimizers."""
        module = self.lightning_module
        if type(module).configure_model is pl.LightningModule.configure_model:
            raise ValueError(
                f"{type(self).__name__} needs a configure_model() hook on "
                f"{type(module).__name__}, as Lightning's ModelParallelStrategy does: add "
                "`def configure_model(self): pass` and the strategy shards every transformer "
                "block itself (or apply fully_shard there yourself)"
            )
        if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
            raise TypeError(
                "found modules wrapped with FSDP1's FullyShardedDataParallel; "
                f"{type(self).__name__} uses FSDP2 (fully_shard) only"
            )
        if not any(isinstance(m, FSDPModule) for m in module.modules()):
            self._shard(module)
        if self.compress:
            self._install_reduce_scatter(module)
            self._prepare_kernels()
        if self.all_gather_format != "none":
            self._install_all_gather(module)
        super().setup(trainer)

    def _shard(self, module: torch.nn.Module) -> None:
        mesh = self.device_mesh["data_parallel"]
        kept_whole = None
        if self.frozen == "replicate":
            kept_whole = {p for p in module.parameters() if not p.requires_grad}
        for target in shard_targets(module, self.shard_modules, self.min_num_params):
            fully_shard(
                target,
                mesh=mesh,
                mp_policy=self.mp_policy,
                offload_policy=self.offload_policy,
                reshard_after_forward=self.reshard_after_forward,
                ignored_params=kept_whole,
            )

    def _install_reduce_scatter(self, module: torch.nn.Module) -> None:
        units = [(n, m) for n, m in module.named_modules() if isinstance(m, FSDPModule)]
        if not units:
            raise RuntimeError(
                "no FSDP2 unit found after configure_model(): fully_shard was not applied"
            )
        for name, unit in units:
            if not hasattr(unit, "set_custom_reduce_scatter"):
                raise RuntimeError(
                    "this PyTorch has no FSDPModule.set_custom_reduce_scatter; the compressed "
                    f"strategy needs a newer torch (found {torch.__version__})"
                )
            unit.set_custom_reduce_scatter(
                CompressedReduceScatter(self.comm_state, name or "root", unit)
            )

    def _install_all_gather(self, module: torch.nn.Module) -> None:
        gathered = self.mp_policy.param_dtype
        self._gatherers = []
        for name, unit in module.named_modules():
            if not isinstance(unit, FSDPModule):
                continue
            dtypes = {
                gathered if gathered is not None and p.is_floating_point() else p.dtype
                for _, p in own_parameters(unit)
            }
            if not dtypes <= set(GATHERABLE_DTYPES) or len(dtypes) > 1:
                found = sorted(map(str, dtypes))
                raise ValueError(
                    f"all_gather={self.all_gather_format!r} needs the parameters of FSDP unit "
                    f"{name or 'root'!r} in one floating-point dtype, found {found}; set "
                    "param_dtype, shard differently or use all_gather='none'"
                )
            if not hasattr(unit, "set_custom_all_gather"):
                raise RuntimeError(
                    "this PyTorch has no FSDPModule.set_custom_all_gather; all_gather="
                    f"{self.all_gather_format!r} needs a newer torch (found {torch.__version__}) "
                    "or use all_gather='none'"
                )
            gatherer = CompressedAllGather(
                self.comm_state,
                name or "root",
                self.all_gather_format,
                self.comm_state.compressor.block_size,
            )
            try:
                unit.set_custom_all_gather(gatherer)
            except ValueError as error:  # e.g. several parameter groups from shard_placement_fn
                raise ValueError(
                    f"all_gather={self.all_gather_format!r} cannot serve FSDP unit "
                    f"{name or 'root'!r}: {error}"
                ) from error
            self._gatherers.append(gatherer)

    # ---------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.comm_state.step = self.lightning_module.trainer.global_step
        super().on_train_batch_start(batch, batch_idx)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
        output = super().optimizer_step(*args, **kwargs)
        if self.compress or self.all_gather_format != "none":
            self._log_comm_metrics()
        return output

    # ---------------------------------------------------------------- checkpoints
    #: Callbacks whose state shapes the optimizer (the freezer) apply it before the load.
    applies_callback_state_first = True
    #: Callbacks may put their per-parameter tensors in their state as ``DTensor`` shards.
    keeps_callback_tensors_sharded = True

    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        filepath: CheckpointPath,
        storage_options: Any | None = None,
    ) -> None:
        """Save as ``ModelParallelStrategy`` does, plus every rank's residuals and step counter,
        and the callbacks' sharded tensors (masks, scores, reference copies).

        A sharded checkpoint folder gets ``compression_state.rank{r}.pt`` from each rank and the
        callbacks' ``DTensor`` shards in ``callback_tensors/`` (``torch.distributed.checkpoint``,
        each rank writing its own; the metadata file keeps a reference in their place); a full
        single-file checkpoint holds all ranks' states under ``"lightning_3d_compression"`` and
        whole copies of the callbacks' tensors.
        """
        callbacks = checkpoint.get("callbacks")
        if self.save_distributed_checkpoint:
            tensors: dict[str, torch.Tensor] = {}
            if callbacks is not None:
                checkpoint["callbacks"], tensors = split_sharded(callbacks)
            super().save_checkpoint(checkpoint, filepath, storage_options)
            directory = Path(self.broadcast(str(filepath)))
            if tensors:
                dcp.save(tensors, checkpoint_id=directory / CALLBACK_TENSORS)
            torch.save(self._local_comm_state(), _state_file(directory, self.global_rank))
            self.barrier()
            return
        if callbacks is not None:
            checkpoint["callbacks"] = gather_sharded(callbacks)
        states = self._gather_comm_states()
        if states is not None:
            checkpoint[STATE_KEY] = states
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(
        self, checkpoint_path: CheckpointPath, weights_only: bool | None = None
    ) -> Any:
        before_strategy_load(self.lightning_module.trainer, checkpoint_path)
        checkpoint = super().load_checkpoint(checkpoint_path, **load_options(weights_only))
        for gatherer in self._gatherers:  # the weights change: int4_delta restarts from int8
            gatherer.reset()
        path = Path(self.broadcast(str(checkpoint_path)))
        states = checkpoint.pop(STATE_KEY, None)
        if path.is_dir():
            self._load_callback_tensors(checkpoint, path / CALLBACK_TENSORS)
            file = _state_file(path, self.global_rank)
            local = torch.load(file, weights_only=True) if file.exists() else None
        else:
            local = states[self.global_rank] if states and self.global_rank < len(states) else None
        self._restore_comm_state(local, path)
        return checkpoint

    def _load_callback_tensors(self, checkpoint: dict[str, Any], folder: Path) -> None:
        """Put each rank's shard of the callbacks' tensors back where their references are."""
        callbacks = checkpoint.get("callbacks")
        meshes = [
            p.device_mesh for p in self.lightning_module.parameters() if hasattr(p, "device_mesh")
        ]
        if callbacks is None or not folder.exists() or not meshes:
            return
        tensors = sharded_templates(callbacks, meshes[0])
        dcp.load(tensors, checkpoint_id=folder)
        checkpoint["callbacks"] = join_sharded(callbacks, tensors)

    def save_full_state_dict(self, path: CheckpointPath) -> None:
        """Gather the unsharded LightningModule state dict and save it from rank 0.

        Call on every rank (it is a collective). The file loads on one device with
        ``task.load_state_dict(torch.load(path, weights_only=True))``.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        assert self.model is not None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        if self.is_global_zero:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, path)
        self.barrier()
