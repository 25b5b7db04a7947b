"""What the compressed strategies share: metrics through the Lightning loggers, and checkpoints
that carry every rank's error-feedback residuals."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, TypeAlias

import torch
import torch.distributed as dist

from lightning_3d.collectives import CollectiveError, CommStats, CompressedCommState
from lightning_3d.compression import GradientCompressor
from lightning_3d.loggers import log_axis_metrics

log = logging.getLogger(__name__)

#: A checkpoint's file or folder, as Lightning passes it.
CheckpointPath: TypeAlias = str | os.PathLike[str]
STATE_KEY = "lightning_3d_compression"
NONFINITE = ("propagate", "skip")


def _distributed() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def load_options(weights_only: bool | None) -> dict[str, bool]:
    """The keyword arguments of a strategy's ``load_checkpoint`` call: Lightning before 2.6
    has no ``weights_only`` (and never passes one)."""
    return {} if weights_only is None else {"weights_only": weights_only}


def make_compressor(
    density: float,
    value_format: str,
    block_size: int,
    selection: str,
    min_numel: int,
    nonfinite: str,
) -> GradientCompressor:
    """The codec a strategy's arguments describe (each argument checked, by name).

    ``nonfinite="propagate"`` passes NaN on to the receiving ranks, as an uncompressed reduction
    would (GradScaler and anomaly checks then see it); ``"skip"`` sends zeros instead and counts
    the message. Either way the residual is left untouched.
    """
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    return GradientCompressor(
        density=density,
        block_size=block_size,
        value_format=value_format,
        selection=selection,
        min_numel=min_numel,
        nonfinite="raise" if nonfinite == "propagate" else "skip",
    )


class CompressionStrategyMixin:
    """Mixed into a Lightning strategy that owns a :class:`CompressedCommState` as ``comm_state``.

    Logs, every ``log_every_n_steps`` optimizer steps, summed over ranks, to the loggers and into
    ``trainer.callback_metrics``: ``comm/wire_bytes`` and ``comm/dense_bytes`` (gradients),
    ``comm/all_gather_wire_bytes`` and ``comm/all_gather_dense_bytes`` (parameters),
    ``comm/compression_ratio`` (dense over wire bytes, both directions together),
    ``comm/residual_norm``, ``comm/seconds`` (mean per rank), ``comm/compressing`` (0 during
    warm-up) and ``comm/nonfinite_messages``.
    ``comm_totals`` keeps this rank's figures over the whole run (its non-finite count as of
    the last logging step: reading it from the device waits for the device, so only logging
    steps do).
    """

    comm_state: CompressedCommState

    def _init_comm_metrics(self) -> None:
        self.comm_totals = CommStats()
        self._comm_window = CommStats()

    def _log_comm_metrics(self) -> None:
        trainer = self.lightning_module.trainer  # type: ignore[attr-defined]
        every = trainer.log_every_n_steps
        # as Lightning's own logging: every n-th step (counting from 1), never when n is 0; the
        # same steps on every rank (the sums below are a collective)
        logging_step = bool(every) and (trainer.global_step + 1) % every == 0
        stats = self.comm_state.take_stats(read_device=logging_step)
        self.comm_totals.add(stats)
        self._comm_window.add(stats)
        if not logging_step:
            return
        window, self._comm_window = self._comm_window, CommStats()
        figures = torch.tensor(
            [
                window.wire_bytes,
                window.dense_bytes,
                window.all_gather_wire_bytes,
                window.all_gather_dense_bytes,
                window.seconds,
                self.comm_state.residual_norm() ** 2,
                window.nonfinite,
            ],
            dtype=torch.float64,
            device=self.root_device,  # type: ignore[attr-defined]
        )
        if _distributed():
            dist.all_reduce(figures, group=self.comm_state.process_group)
        wire, dense, gather_wire, gather_dense, seconds, residual_sq, nonfinite = figures.tolist()
        sent, replaced = wire + gather_wire, dense + gather_dense
        metrics = {
            "comm/wire_bytes": wire,
            "comm/dense_bytes": dense,
            "comm/all_gather_wire_bytes": gather_wire,
            "comm/all_gather_dense_bytes": gather_dense,
            "comm/compression_ratio": replaced / sent if sent else 1.0,
            "comm/residual_norm": math.sqrt(residual_sq),
            "comm/seconds": seconds / self.world_size,  # type: ignore[attr-defined]
            "comm/compressing": float(self.comm_state.compressing),
            "comm/nonfinite_messages": nonfinite,
        }
        log_axis_metrics(trainer, metrics)

    def on_exception(self, exception: BaseException) -> None:
        """Name the likely cause when a collective fails, so the log of every survivor says it."""
        text = str(exception)
        if isinstance(exception, (CollectiveError, dist.DistError)) or any(
            word in text for word in ("gloo", "NCCL", "Connection", "timed out")
        ):
            log.error(
                "rank %d stopped: a collective failed (%s). If another rank exited first, its "
                "log holds the original error.",
                self.global_rank,  # type: ignore[attr-defined]
                type(exception).__name__,
            )
        super().on_exception(exception)  # type: ignore[misc]

    def _prepare_kernels(self) -> None:
        """Compile (or load from the cache) the codec's kernels for this rank's device, then wait
        for every rank: a rank compiling inside its first collective would keep the others
        waiting in ``all_to_all`` for minutes, close to the collective timeout."""
        backend = self.comm_state.compressor.backend_for(self.root_device)  # type: ignore[attr-defined]
        log.info("compression kernels on %s: %s", self.root_device, backend)  # type: ignore[attr-defined]
        self.barrier("lightning_3d_kernels")  # type: ignore[attr-defined]

    def _local_comm_state(self) -> dict[str, Any]:
        return {"world_size": self.world_size, **self.comm_state.state_dict()}  # type: ignore[attr-defined]

    def _gather_comm_states(self) -> list[dict[str, Any]] | None:
        """Every rank's state on rank 0, ``None`` elsewhere (a collective; residuals travel
        pickled, on the CPU, to rank 0 only)."""
        local = self._local_comm_state()
        if not _distributed():
            return [local]
        states: list[Any] | None = [None] * self.world_size if self.is_global_zero else None  # type: ignore[attr-defined]
        dist.gather_object(local, states, dst=0)
        return states

    def _restore_comm_state(self, local: dict[str, Any] | None, source: Path) -> None:
        """Load this rank's saved state, or say why the residuals start from zero."""
        rank, world = self.global_rank, self.world_size  # type: ignore[attr-defined]
        if local is None:
            log.warning(
                "%s holds no compression state for rank %d; residuals start at 0", source, rank
            )
        elif local["world_size"] != world:
            log.warning(
                "%s was saved by %d ranks and this run has %d; residuals start at 0",
                source,
                local["world_size"],
                world,
            )
            self.comm_state.step = int(local["step"])
        else:
            self.comm_state.load_state_dict(local)
