"""``CompressedDDPStrategy``: DDP whose gradient all-reduce goes through the compressed hook."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy

from lightning_3d.collectives import CompressedAllReduceState, compressed_allreduce_hook
from lightning_3d.strategies._compressed import (
    STATE_KEY,
    CheckpointPath,
    CompressionStrategyMixin,
    load_options,
    make_compressor,
)


class CompressedDDPStrategy(CompressionStrategyMixin, DDPStrategy):
    """DDP with :func:`~lightning_3d.collectives.compressed_allreduce_hook` (``"ddp_compressed"``).

    Equivalent to ``DDPStrategy(ddp_comm_hook=compressed_allreduce_hook, ddp_comm_state=state)``
    with three additions: the hook is registered on every device (Lightning's ``DDPStrategy``
    registers communication hooks on CUDA only, and silently skips them on CPU/gloo), every rank's
    residuals are saved in and restored from checkpoints, and the ``comm/*`` metrics are logged.

    Args:
        density, value_format, block_size, selection, min_numel, residual_dtype, error_feedback,
            nonfinite: as for :class:`~lightning_3d.strategies.CompressedFSDPStrategy`.
        warmup_steps: optimizer steps sent dense first (the first iteration after DDP wraps the
            model always is: DDP rebuilds its gradient buckets after it).
        **ddp_kwargs: passed to Lightning's ``DDPStrategy`` (``process_group_backend``,
            ``timeout``, ``find_unused_parameters``, ...).

    Example::

        trainer = Trainer(strategy=CompressedDDPStrategy(density=0.1), devices=8)
    """

    strategy_name = "ddp_compressed"

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
        nonfinite: str = "propagate",
        **ddp_kwargs: Any,
    ) -> None:
        for taken in ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper"):
            if taken in ddp_kwargs:
                raise ValueError(
                    f"{taken} is set by CompressedDDPStrategy; use DDPStrategy instead"
                )
        compressor = make_compressor(
            density, value_format, block_size, selection, min_numel, nonfinite
        )
        self.comm_state = CompressedAllReduceState(
            compressor, warmup_steps, error_feedback, residual_dtype
        )
        super().__init__(
            ddp_comm_hook=compressed_allreduce_hook, ddp_comm_state=self.comm_state, **ddp_kwargs
        )
        self._init_comm_metrics()

    def setup(self, trainer: pl.Trainer) -> None:
        self._prepare_kernels()  # before DDP's first collective
        super().setup(trainer)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The step from the trainer, the same on every rank, also on one resumed without its own
        # saved state: ranks that disagreed on warm-up would mix all_reduce and all_to_all.
        self.comm_state.step = self.lightning_module.trainer.global_step
        super().on_train_batch_start(batch, batch_idx)

    def configure_ddp(self) -> None:
        self.comm_state.iterations_since_registered = 0  # a new DDP wrapper: buckets rebuilt
        super().configure_ddp()
        if self.root_device.type != "cuda":  # Lightning only registers hooks on CUDA
            self.model.register_comm_hook(self.comm_state, compressed_allreduce_hook)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
        output = super().optimizer_step(*args, **kwargs)
        self._log_comm_metrics()
        return output

    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        filepath: CheckpointPath,
        storage_options: Any | None = None,
    ) -> None:
        """Save as ``DDPStrategy`` does (rank 0), with every rank's residuals in the file."""
        states = self._gather_comm_states()
        if states is not None:
            checkpoint[STATE_KEY] = states
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(
        self, checkpoint_path: CheckpointPath, weights_only: bool | None = None
    ) -> Any:
        checkpoint = super().load_checkpoint(checkpoint_path, **load_options(weights_only))
        states = checkpoint.pop(STATE_KEY, None)
        rank = self.global_rank
        local = states[rank] if states and rank < len(states) else None
        self._restore_comm_state(local, checkpoint_path)
        return checkpoint
