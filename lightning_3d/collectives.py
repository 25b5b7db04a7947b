"""Compressed collectives: an FSDP2 reduce-scatter and a DDP all-reduce hook with error feedback.

Both send gradients through :class:`~lightning_3d.compression.GradientCompressor` (top-k + 8-bit
block quantization + bitmap positions) and carry what was not sent to the next step.

**Compressed reduce-scatter** (what FSDP2 calls once per FSDP module and backward pass). Rank
``p`` holds the full gradient ``G_p`` laid out as ``W`` chunks, chunk ``q`` destined for rank ``q``
(``W`` ranks, ``S`` entries per chunk, FSDP's padding included). For every destination ``q != p``
rank ``p`` compresses ``e_pq = G_pq + r_pq`` with its own residual ``r_pq`` (``r_pq <- e_pq -
D(C(e_pq))``) into a fixed-size slot; one ``all_to_all`` exchanges the slots (``all_gather`` where
the backend lacks it); rank ``q`` decodes and sums

    ``out_q = scale(op) * (G_qq + sum_{p != q} D(C(e_pq)))``

in fp32, then rounds to the gradient dtype. Its own chunk ``G_qq`` never crosses the network and
is added exactly. ``scale`` is 1 for ``SUM``, ``1 / W`` for ``AVG`` and ``f`` for
``PREMUL_SUM(f)``: the ops FSDP2 uses, including its gradient divide factors.

**Compressed all-reduce** (DDP comm hook, as DeepSpeed's compressed all-reduce): the flat bucket
is padded to ``W * S`` and reduce-scattered as above (worker residuals), each rank averages its
chunk, compresses it with a second, "server" residual, and an ``all_gather`` gives every rank all
chunks, which all ranks decode identically, so every replica applies the same gradient.

**Warm-up**: while ``state.step < warmup_steps`` everything is sent dense (as PowerSGD's
``start_powerSGD_iter``); with ``warmup_steps`` larger than the run, the collectives equal the
uncompressed ones up to float summation order.

Example (one process; the same code runs on every rank of a real group)::

    >>> import torch, torch.distributed as dist
    >>> from lightning_3d.compression import GradientCompressor
    >>> state = CompressedCommState(GradientCompressor(density=0.1, min_numel=0))
    >>> # fully_shard(module); module.set_custom_reduce_scatter(
    >>> #     CompressedReduceScatter(state, "layer0"))
    >>> reduce_op_scale(dist.ReduceOp.AVG, world_size=4)
    0.25
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from lightning_3d.compression import GradientCompressor

# FSDP2 exports its custom-collective base classes from a private module only. This is the one
# place that imports it; tests/test_strategies.py fails naming it if it moves.
FSDP_API_MODULE = "torch.distributed.fsdp._fully_shard._fsdp_api"
try:
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
except ImportError as error:  # pragma: no cover - depends on the torch build
    AllGather = ReduceScatter = object  # type: ignore[assignment,misc]
    _FSDP_API_MISSING: str | None = (
        f"this torch ({torch.__version__}) has no {FSDP_API_MODULE} ({error}); "
        "the compressed FSDP2 collectives need torch >= 2.9"
    )
else:
    _FSDP_API_MISSING = None

log = logging.getLogger(__name__)

Exchange = Literal["auto", "all_to_all", "all_gather"]
ReduceOpLike = dist.ReduceOp | dist.ReduceOp.RedOpType
EXCHANGES = ("auto", "all_to_all", "all_gather")
RESIDUAL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def slot_nbytes(compressor: GradientCompressor, numel: int, dtype: torch.dtype, dense: bool) -> int:
    """Size of one fixed slot (:meth:`GradientCompressor.slot_layout`), a multiple of 16 bytes."""
    return compressor.slot_layout(numel, dtype, dense).nbytes


# torch 2.13 renamed ``all_gather_into_tensor`` to ``all_gather_single`` (the old name warns on
# every call site); older torch has only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CollectiveError(RuntimeError):
    """A compressed collective failed, usually because another rank died or timed out."""


def reduce_op_scale(op: ReduceOpLike, world_size: int) -> float:
    """The factor a reduce-scatter applies to the sum for ``op`` (``SUM``, ``AVG``, ``PREMUL_SUM``).

    >>> reduce_op_scale(dist.ReduceOp.SUM, world_size=2)
    1.0
    """
    kind = getattr(op, "op", op)
    if kind == dist.ReduceOp.SUM:
        return 1.0
    if kind == dist.ReduceOp.AVG:
        return 1.0 / world_size
    if kind == dist.ReduceOp.PREMUL_SUM:
        return float(op.factor)
    raise ValueError(f"compressed collectives support SUM, AVG and PREMUL_SUM, not {op}")


@dataclass
class CommStats:
    """What the compressed collectives did since the last :meth:`CompressedCommState.take_stats`.

    Attributes:
        wire_bytes: bytes this rank put into collectives (fixed-size slots included).
        dense_bytes: bytes the uncompressed collective would have sent for the same gradients.
        seconds: host wall time spent in compression, exchange and decoding (on a GPU this
            includes the syncs the codec makes, not kernels still queued when it returns).
        calls: number of collective calls.
        nonfinite: chunks with NaN/Inf (sent flagged, or kept by their own rank).
        all_gather_wire_bytes: bytes this rank put into compressed parameter all-gathers.
        all_gather_dense_bytes: bytes FSDP2's own all-gathers would have sent for them.
    """

    wire_bytes: int = 0
    dense_bytes: int = 0
    seconds: float = 0.0
    calls: int = 0
    nonfinite: int = 0
    all_gather_wire_bytes: int = 0
    all_gather_dense_bytes: int = 0

    def add(self, other: CommStats) -> None:
        """Add ``other``'s figures to these."""
        self.wire_bytes += other.wire_bytes
        self.dense_bytes += other.dense_bytes
        self.seconds += other.seconds
        self.calls += other.calls
        self.nonfinite += other.nonfinite
        self.all_gather_wire_bytes += other.all_gather_wire_bytes
        self.all_gather_dense_bytes += other.all_gather_dense_bytes


class CompressedCommState:
    """Settings, step counter, residuals and statistics shared by every compressed collective.

    One state serves a whole model (all of its FSDP modules, or all DDP buckets); residuals are
    keyed by a name per module or bucket and destination. ``step`` counts optimizer steps: the
    Lightning strategy sets it, the DDP hook counts iterations.

    Args:
        compressor: the codec (density, value format, block size, selection, small-tensor cut).
        warmup_steps: steps sent dense before compression starts.
        error_feedback: carry what was not sent to the next step (turn off only to measure it).
        residual_dtype: ``"float32"`` or ``"bfloat16"`` (half the memory, rounded each step).
        exchange: ``"all_to_all"``, ``"all_gather"`` (for backends without all-to-all, more
            traffic) or ``"auto"`` (all-to-all, falling back once with a warning).
        process_group: the group to communicate in (the default group when ``None``).

    >>> state = CompressedCommState(GradientCompressor(), warmup_steps=10)
    >>> state.compressing
    False
    """

    def __init__(
        self,
        compressor: GradientCompressor,
        warmup_steps: int = 0,
        error_feedback: bool = True,
        residual_dtype: str = "float32",
        exchange: Exchange = "auto",
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(
                f"residual_dtype must be one of {sorted(RESIDUAL_DTYPES)}, got {residual_dtype!r}"
            )
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
        self.compressor = compressor
        self.warmup_steps = warmup_steps
        self.error_feedback = error_feedback
        self.residual_dtype = RESIDUAL_DTYPES[residual_dtype]
        self.exchange: Exchange = exchange
        self.process_group = process_group
        self.step = 0
        self.residuals: dict[str, torch.Tensor] = {}
        self.layouts: dict[str, tuple[Any, ...]] = {}
        self.stats = CommStats()
        self.probing = False
        self._nonfinite: torch.Tensor | None = None  # counted on the device, read in take_stats

    @contextmanager
    def probe(self) -> Iterator[None]:
        """Inside the block collectives send exactly (dense) and leave residuals and the step
        counter alone: for gradients that are measured, not applied (a signal pass), whose
        unsent part must not leak into the first real steps.

        >>> state = CompressedCommState(GradientCompressor())
        >>> with state.probe():
        ...     state.compressing
        False
        """
        self.probing, before = True, self.probing
        try:
            yield
        finally:
            self.probing = before

    @property
    def recorded(self) -> CommStats:
        """Where a collective adds its figures: :attr:`stats`, or a scratch record while
        probing (a signal pass's traffic is not the run's)."""
        return CommStats() if self.probing else self.stats

    def count_nonfinite(self, flagged: torch.Tensor) -> None:
        """Add the non-finite messages in ``flagged`` (a bool tensor) without a host sync (not
        while probing)."""
        if self.probing:
            return
        count = flagged.sum(dtype=torch.int64)
        self._nonfinite = count if self._nonfinite is None else self._nonfinite + count

    @property
    def compressing(self) -> bool:
        """Whether this step compresses (warm-up over, not probing)."""
        return self.step >= self.warmup_steps and not self.probing

    def residual(
        self, key: str, numel: int, device: torch.device, layout: tuple[Any, ...] | None = None
    ) -> torch.Tensor | None:
        """The residual for ``key``: created (zeros) once compression starts, ``None`` before
        and while probing.

        ``layout`` names what the residual's entries belong to (for an FSDP unit: the names and
        shapes of the parameters that have gradients). A residual whose size or layout no longer
        matches (DDP rebuilt its buckets; the freezer changed which parameters train) would add
        its mass to the wrong entries: it starts again from zero, with a warning for a layout.
        """
        if not self.error_feedback or self.probing:
            return None
        residual = self.residuals.get(key)
        if layout is not None:
            known = self.layouts.get(key)
            if known is not None and known != layout and residual is not None:
                log.warning(
                    "the parameters behind residual %s changed (%d -> %d tensors with "
                    "gradients); its carried gradient mass is dropped and it restarts from zero",
                    key,
                    len(known),
                    len(layout),
                )
                del self.residuals[key]
                residual = None
            self.layouts[key] = layout
        if residual is not None and residual.numel() == numel:
            if residual.device != device:  # loaded from a checkpoint onto the CPU
                residual = self.residuals[key] = residual.to(device)
            return residual
        if not self.compressing:
            return None
        if residual is not None:
            log.info(
                "residual %s changed size (%d -> %d); restarting it", key, residual.numel(), numel
            )
        residual = torch.zeros(numel, dtype=self.residual_dtype, device=device)
        self.residuals[key] = residual
        return residual

    def residual_norm(self) -> float:
        """The 2-norm of all residuals of this rank together."""
        if not self.residuals:
            return 0.0
        squares = [r.float().pow(2).sum() for r in self.residuals.values()]
        device = squares[0].device  # one host sync for all residuals, not one each
        return math.sqrt(float(torch.stack([s.to(device) for s in squares]).sum()))

    def take_stats(self, read_device: bool = True) -> CommStats:
        """Return the statistics gathered since the last call and start new ones.

        With ``read_device`` (the one place that waits for the device) the non-finite count
        kept on the device is read and included; without it, that count waits for a later call.
        """
        stats, self.stats = self.stats, CommStats()
        if read_device and self._nonfinite is not None:
            stats.nonfinite += int(self._nonfinite)
            self._nonfinite = None
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Step counter, residuals (on CPU) and their parameter layouts, of this rank."""
        residuals = {key: value.detach().cpu() for key, value in self.residuals.items()}
        layouts = {key: [list(entry) for entry in value] for key, value in self.layouts.items()}
        return {"step": self.step, "residuals": residuals, "layouts": layouts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.residuals = {
            key: value.to(self.residual_dtype).clone() for key, value in state["residuals"].items()
        }
        self.layouts = {
            key: tuple((name, tuple(shape)) for name, shape in value)
            for key, value in state.get("layouts", {}).items()
        }


def exchange_slots(
    send: torch.Tensor, group: dist.ProcessGroup | None, state: CompressedCommState
) -> torch.Tensor:
    """Send row ``q`` of ``send`` (``[W, slot]`` uint8) to rank ``q``; row ``p`` of the result
    came from rank ``p``."""
    method = state.exchange
    try:
        if method in ("auto", "all_to_all"):
            received = torch.empty_like(send)
            try:
                dist.all_to_all_single(received, send, group=group)
                return received
            except (RuntimeError, NotImplementedError) as error:
                if method == "all_to_all" or "not supported" not in str(error).lower():
                    raise
                log.warning(
                    "this process group has no all_to_all (%s); compressed collectives use "
                    "all_gather instead, which sends world_size times more bytes",
                    error,
                )
                state.exchange = "all_gather"
        world, rank = send.shape[0], dist.get_rank(group)
        gathered = send.new_empty(world * world, send.shape[1])
        _all_gather_single(gathered, send, group=group)
        return gathered.view(world, world, -1)[:, rank]
    except RuntimeError as error:
        raise CollectiveError(_failure_message(group, error)) from error


def _failure_message(group: dist.ProcessGroup | None, error: BaseException) -> str:
    return (
        f"compressed collective failed on rank {dist.get_rank(group)} of "
        f"{dist.get_world_size(group)}: {error}. If another rank died or timed out, its log says "
        "why."
    )


def exchange_bytes_per_call(state: CompressedCommState, slot: int, world: int) -> int:
    """Bytes this rank puts into one exchange of ``world`` slots of ``slot`` bytes."""
    if state.exchange == "all_gather":
        return world * slot * (world - 1)
    return slot * (world - 1)


def encode_slots(
    chunks: torch.Tensor,
    rank: int,
    state: CompressedCommState,
    key: str,
    dense: bool,
    layout: tuple[Any, ...] | None = None,
) -> torch.Tensor:
    """``[W, slot]`` uint8: row ``q`` holds chunk ``q`` compressed with residual ``key/to{q}``
    (row ``rank`` stays zero: a rank's own chunk never crosses the network).

    Nothing here waits for the device: a chunk with NaN/Inf only sets its slot's non-finite
    count, which the receiver reads on the device and which is counted in the statistics.
    """
    world, numel = chunks.shape
    compressor = state.compressor
    slot = slot_nbytes(compressor, numel, chunks.dtype, dense)
    send = torch.zeros(world, slot, dtype=torch.uint8, device=chunks.device)
    for destination in range(world):
        if destination == rank:
            continue
        residual = state.residual(f"{key}/to{destination}", numel, chunks.device, layout)
        compressor.encode_into(chunks[destination], residual, send[destination], dense=dense)
    flags = send[:, :8].contiguous().view(torch.int64).view(-1)
    state.count_nonfinite(flags > 0)
    return send


def own_chunk(chunk: torch.Tensor, state: CompressedCommState) -> torch.Tensor:
    """This rank's own chunk in fp32 (a copy), under the compressor's non-finite policy: left as
    it is with ``"raise"`` (NaN travels on), zeros with ``"skip"``, counted either way."""
    total = chunk.to(torch.float32, copy=True)  # never write into the caller's input
    flagged = ~torch.isfinite(total).all()
    state.count_nonfinite(flagged)
    if state.compressor.nonfinite == "skip":
        total.masked_fill_(flagged, 0.0)
    return total


def compressed_reduce_scatter(
    chunks: torch.Tensor,
    group: dist.ProcessGroup | None,
    state: CompressedCommState,
    key: str,
    layout: tuple[Any, ...] | None = None,
) -> torch.Tensor:
    """Sum chunk ``rank`` over all ranks, each remote chunk compressed with error feedback.

    Every slot has a size all ranks compute alike (:meth:`GradientCompressor.slot_layout`), so
    the exchange needs no header on the host; with exact selection on CUDA nothing in the call
    synchronizes with the host.

    Args:
        chunks: ``[W, S]`` gradient (fp32, bf16 or fp16); row ``q`` is destined for rank ``q``.
        group: the process group (``W`` ranks).
        state: settings, residuals and statistics.
        key: names the caller (module or bucket) so each keeps its own residuals.
        layout: what the entries belong to (see :meth:`CompressedCommState.residual`).

    Returns:
        The fp32 sum ``[S]`` for this rank's chunk (not yet scaled for the reduce op).
    """
    started = time.perf_counter()
    world, numel = chunks.shape
    rank = dist.get_rank(group)
    compressor, dense = state.compressor, not state.compressing
    send = encode_slots(chunks, rank, state, key, dense, layout)
    received = exchange_slots(send, group, state)
    total = own_chunk(chunks[rank], state)
    for source in range(world):
        if source != rank:
            compressor.decode_from(
                received[source], total, chunks.dtype, accumulate=True, dense=dense
            )
    stats = state.recorded
    stats.wire_bytes += exchange_bytes_per_call(state, send.shape[1], world)
    stats.dense_bytes += numel * chunks.element_size() * (world - 1)
    stats.seconds += time.perf_counter() - started
    stats.calls += 1
    return total


class _FSDPComm:
    """What both custom FSDP2 collectives share: the API check and a plain output buffer."""

    def __init__(self) -> None:
        if _FSDP_API_MISSING is not None:
            raise RuntimeError(_FSDP_API_MISSING)

    def allocate(
        self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class CompressedReduceScatter(_FSDPComm, ReduceScatter):
    """FSDP2 ``ReduceScatter`` that compresses each destination's chunk (module docstring).

    Install with ``fsdp_module.set_custom_reduce_scatter(CompressedReduceScatter(state, name,
    fsdp_module))``; :class:`~lightning_3d.strategies.CompressedFSDPStrategy` does it for every
    FSDP module. With ``unit`` given, residuals are tied to the names and shapes of the unit's
    parameters that require gradients, so freezing or unfreezing restarts them (with a warning)
    instead of adding their mass to other parameters.
    """

    def __init__(
        self, state: CompressedCommState, name: str, unit: torch.nn.Module | None = None
    ) -> None:
        super().__init__()
        self.state = state
        self.name = name
        self.unit = unit
        # the names are fixed once sharded; the parameter objects are not (FSDP2 swaps them)
        self._own_names = None if unit is None else [n for n, _ in own_parameters(unit)]

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: ReduceOpLike,
        async_op: bool = False,
    ) -> None:
        world = dist.get_world_size(group)
        scale = reduce_op_scale(op, world)
        chunks = input_tensor.view(world, -1)
        layout = None if self.unit is None else trainable_layout(self.unit, self._own_names)
        total = compressed_reduce_scatter(chunks, group, self.state, self.name, layout)
        if scale != 1.0:
            total.mul_(scale)
        output_tensor.view(-1).copy_(total)
        return None


ALL_GATHER_FORMATS = ("none", "bf16", "int8", "int4_delta")
GATHERABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QUANTIZED_LEVELS = {8: 127, 4: 7}


def quantize_blocks(
    x: torch.Tensor, block_size: int, codes: torch.Tensor, scales: torch.Tensor, levels: int = 127
) -> None:
    """Symmetric integers with one fp32 scale per ``block_size`` entries (as DeepSpeed's qwZ):
    ``s_b = max|x_b| / levels``, ``q_i = round(x_i / s_b)`` (0 where ``s_b = 0``), into ``codes``
    (int8, ``blocks * block_size``: the tail past ``x`` is zero) and ``scales`` (fp32).
    ``levels`` is 127 for int8 and 7 for int4."""
    blocks = scales.numel()
    padded = x.new_zeros(blocks * block_size, dtype=torch.float32)
    padded[: x.numel()] = x.reshape(-1)
    grouped = padded.view(blocks, block_size)
    scales.copy_(grouped.abs().amax(dim=1) / levels)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)
    codes.view(blocks, block_size).copy_(torch.round(grouped / safe).clamp_(-levels, levels))


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Int8 codes in ``[-7, 7]`` (an even count) as unsigned nibbles, two per byte: entry ``2i``
    in the low half of byte ``i``, entry ``2i + 1`` in the high half, each offset by 8.

    Example:
        >>> pack_nibbles(torch.tensor([-7, 7, 0, 1], dtype=torch.int8)).tolist()
        [241, 152]
    """
    offset = (codes.to(torch.int16) + 8).to(torch.uint8).view(-1, 2)
    return offset[:, 0] | (offset[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The int8 codes :func:`pack_nibbles` packed.

    Example:
        >>> unpack_nibbles(torch.tensor([241, 152], dtype=torch.uint8)).tolist()
        [-7, 7, 0, 1]
    """
    pairs = torch.stack((packed & 15, packed >> 4), dim=1).view(-1)
    return (pairs.to(torch.int16) - 8).to(torch.int8)


def block_slot_nbytes(numel: int, block_size: int, bits: int = 8) -> int:
    """Bytes one rank sends for ``numel`` entries at ``bits`` per code: scales, then codes."""
    blocks = -(-numel // block_size)
    return 4 * blocks + blocks * block_size * bits // 8


def encode_block_slot(x: torch.Tensor, block_size: int, bits: int) -> torch.Tensor:
    """``x`` as one uint8 message: ``blocks`` fp32 scales, then ``bits``-bit codes
    (:func:`quantize_blocks`; int4 codes packed by :func:`pack_nibbles`)."""
    blocks = -(-x.numel() // block_size)
    slot = torch.empty(block_slot_nbytes(x.numel(), block_size, bits), dtype=torch.uint8,
                       device=x.device)  # fmt: skip
    scales = slot[: 4 * blocks].view(torch.float32)
    if bits == 8:
        quantize_blocks(x, block_size, slot[4 * blocks :].view(torch.int8), scales)
    else:
        codes = torch.empty(blocks * block_size, dtype=torch.int8, device=x.device)
        quantize_blocks(x, block_size, codes, scales, QUANTIZED_LEVELS[bits])
        slot[4 * blocks :] = pack_nibbles(codes)
    return slot


def decode_block_slot(slot: torch.Tensor, numel: int, block_size: int, bits: int) -> torch.Tensor:
    """The ``numel`` fp32 values of a message from :func:`encode_block_slot`.

    Example:
        >>> x = torch.tensor([7.0, -3.0, 2.4, 0.0, 3.5, -1.0, 0.6, 0.0])  # scales 1 and 0.5
        >>> decode_block_slot(encode_block_slot(x, 4, 4), 8, 4, 4).tolist()
        [7.0, -3.0, 2.0, 0.0, 3.5, -1.0, 0.5, 0.0]
    """
    blocks = -(-numel // block_size)
    scales = slot[: 4 * blocks].clone().view(torch.float32)  # a copy: the row may be unaligned
    payload = slot[4 * blocks :]
    codes = payload.view(torch.int8) if bits == 8 else unpack_nibbles(payload)
    return (codes.view(blocks, block_size).float() * scales.unsqueeze(1)).view(-1)[:numel]


class CompressedAllGather(_FSDPComm, AllGather):
    """FSDP2 ``AllGather`` that sends each rank's parameter shard as ``"bf16"``, block-``"int8"``
    or ``"int4_delta"``.

    Every rank, its own shard included, writes the *decoded* shards into the unsharded
    parameters, so all ranks compute with identical weights; the sharded fp32 master weights the
    optimizer updates are untouched. Sizes follow from the shard size alone (FSDP2 pads every
    rank's shard to the same length), so nothing waits for the host.

    ``"int4_delta"`` (as SDP4Bit) keeps ``R``, the decoded copy of the whole unit from the last
    gather, on every rank. The first gather (and the first after :meth:`reset`) sends int8 and
    sets ``R`` to what it decoded; every later one sends the *difference* to it in 4 bits, one
    scale per block (levels -7..7), and every rank updates ``R_p <- R_p + D(Q(w_p - R_p))`` for
    each rank ``p``. What was not sent stays in ``w_p - R_p`` and goes out with the next gather,
    so the error never accumulates: after a gather ``|w - R| <= max_b |w - R_prev| / 14`` per
    block (and the gathered dtype's rounding: ``R`` is kept in it, fp32 or FSDP2's
    ``param_dtype``). It costs one unsharded copy of the unit per rank in that dtype (the memory
    ``reshard_after_forward=False`` spends) and is rebuilt, not saved, on resume.

    Wire bytes per rank and gather, for ``n`` fp32 entries: ``n / 2`` (+ ``4 n / block_size``
    of scales) for int4_delta, ``n`` (+ scales) for int8, ``2 n`` for bf16, against ``4 n``
    (``2 n`` with a bf16 ``param_dtype``).

    Example (per FSDP unit; :class:`~lightning_3d.strategies.CompressedFSDPStrategy` does it)::

        unit.set_custom_all_gather(CompressedAllGather(state, "layers.0", "int8"))
    """

    def __init__(
        self, state: CompressedCommState, name: str, value_format: str, block_size: int = 256
    ) -> None:
        super().__init__()
        if value_format not in ALL_GATHER_FORMATS[1:]:
            raise ValueError(
                f"all_gather must be one of {ALL_GATHER_FORMATS}, got {value_format!r}"
            )
        if value_format == "int4_delta" and block_size % 2:
            raise ValueError(f"all_gather='int4_delta' needs an even block_size, got {block_size}")
        self.state = state
        self.name = name
        self.value_format = value_format
        self.block_size = block_size
        self.reference: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the reference copy: the next ``"int4_delta"`` gather sends int8 again (the
        strategy calls this when a checkpoint replaces the weights)."""
        self.reference = None

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        async_op: bool = False,
    ) -> None:
        if input_tensor.dtype not in GATHERABLE_DTYPES:
            raise ValueError(
                f"all_gather={self.value_format!r} needs floating-point parameters of one dtype "
                f"in FSDP unit {self.name!r}; FSDP2 gathers them as {input_tensor.dtype} (mixed "
                "dtypes in one unit): use all_gather='none' or one dtype per unit"
            )
        started = time.perf_counter()
        world, numel = dist.get_world_size(group), input_tensor.numel()
        gathered_view = output_tensor.view(world, numel)
        try:
            if self.value_format == "bf16":
                send = input_tensor.to(torch.bfloat16)
                received = send.new_empty(world * numel)
                _all_gather_single(received, send, group=group)
                gathered_view.copy_(received.view(world, numel))
                slot = 2 * numel
            elif self.value_format == "int8":
                slot = self._gather_blocks(input_tensor, gathered_view, group, 8, add=False)
            else:
                slot = self._gather_delta(input_tensor, gathered_view, group)
        except RuntimeError as error:
            raise CollectiveError(_failure_message(group, error)) from error
        stats = self.state.recorded
        stats.all_gather_wire_bytes += slot * (world - 1)
        stats.all_gather_dense_bytes += numel * input_tensor.element_size() * (world - 1)
        stats.seconds += time.perf_counter() - started
        return None

    def _gather_blocks(
        self,
        values: torch.Tensor,
        target: torch.Tensor,
        group: dist.ProcessGroup,
        bits: int,
        add: bool,
    ) -> int:
        """All-gather ``values`` block-quantized; row ``p`` of ``target`` gets rank ``p``'s
        decoded values (added to it with ``add``). Returns the bytes of one rank's message."""
        send = encode_block_slot(values, self.block_size, bits)
        received = send.new_empty(len(target) * send.numel())
        _all_gather_single(received, send, group=group)
        rows = received.view(len(target), send.numel())
        for source in range(len(target)):  # one shard's fp32 copy at a time, not all of them
            decoded = decode_block_slot(rows[source], values.numel(), self.block_size, bits)
            if add:
                target[source].add_(decoded)
            else:
                target[source].copy_(decoded)
        return send.numel()

    def _gather_delta(
        self, input_tensor: torch.Tensor, gathered_view: torch.Tensor, group: dist.ProcessGroup
    ) -> int:
        world, numel = gathered_view.shape
        reference = self.reference
        if reference is None or reference.shape != (world, numel):
            reference = gathered_view.new_empty((world, numel))  # in the gathered dtype
            slot = self._gather_blocks(input_tensor, reference, group, 8, add=False)
        else:
            # the difference is taken before the output is written: FSDP2's input may alias it
            own = reference[dist.get_rank(group)].float()
            slot = self._gather_blocks(input_tensor.float() - own, reference, group, 4, add=True)
        self.reference = reference
        gathered_view.copy_(reference)
        return slot


def own_parameters(unit: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters FSDP unit ``unit`` itself gathers and reduces: its own, without those of
    FSDP units nested in it (they handle their own)."""
    nested = {
        id(param)
        for name, module in unit.named_modules()
        if name and hasattr(module, "set_custom_reduce_scatter")
        for param in module.parameters()
    }
    return [(name, param) for name, param in unit.named_parameters() if id(param) not in nested]


def trainable_layout(
    unit: torch.nn.Module, names: Sequence[str] | None = None
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Names and shapes of the parameters ``unit`` itself reduces that require gradients: what
    its reduce-scatter carries this step. ``names`` are the unit's :func:`own_parameters` names
    (found once by the caller; looked up again here when not given)."""
    if names is None:
        names = [name for name, _ in own_parameters(unit)]
    parameters = ((name, unit.get_parameter(name)) for name in names)
    return tuple((name, tuple(param.shape)) for name, param in parameters if param.requires_grad)


class CompressedAllReduceState(CompressedCommState):
    """State of :func:`compressed_allreduce_hook`: worker and server residuals per bucket.

    Arguments as :class:`CompressedCommState`; ``warmup_steps`` counts DDP iterations. The first
    iteration after the hook is registered (``iterations_since_registered == 0``) is always sent
    dense: DDP rebuilds its buckets after it, so residuals are only kept for the final layout
    (a strategy resets the counter when it wraps a model again, e.g. on resume).

    Example::

        from lightning.pytorch.strategies import DDPStrategy
        state = CompressedAllReduceState(GradientCompressor(density=0.15), warmup_steps=10)
        strategy = DDPStrategy(ddp_comm_hook=compressed_allreduce_hook, ddp_comm_state=state)
    """

    iterations_since_registered = 0


def compressed_allreduce_hook(
    state: CompressedAllReduceState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: compressed reduce-scatter, then compressed all-gather (averaged).

    Every rank ends with the same averaged gradient: the all-gathered chunks are decoded the same
    way everywhere, including a rank's own chunk.
    """
    group = state.process_group
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    devices = [buffer.device] if buffer.is_cuda else None
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future(devices=devices)
    try:
        if world == 1 or not state.compressing or state.iterations_since_registered == 0:
            dist.all_reduce(buffer, group=group)
            buffer.div_(world)
            ring_bytes = 2 * (world - 1) * -(-buffer.numel() // world) * buffer.element_size()
            stats = state.recorded
            stats.wire_bytes += ring_bytes
            stats.dense_bytes += ring_bytes
        else:
            _compressed_allreduce(buffer, group, state, f"bucket{bucket.index()}")
    except RuntimeError as error:
        if isinstance(error, CollectiveError):
            raise
        raise CollectiveError(_failure_message(group, error)) from error
    if bucket.is_last():
        state.step += 0 if state.probing else 1
        state.iterations_since_registered += 1
    future.set_result(buffer)
    return future


# DDP's register_comm_hook compares these annotations with the real classes; this module's
# ``from __future__ import annotations`` would leave strings there.
compressed_allreduce_hook.__annotations__.update(
    state=CompressedAllReduceState,
    bucket=dist.GradBucket,
)
compressed_allreduce_hook.__annotations__["return"] = torch.futures.Future[torch.Tensor]


def _compressed_allreduce(
    buffer: torch.Tensor, group: dist.ProcessGroup | None, state: CompressedCommState, key: str
) -> None:
    world, numel = dist.get_world_size(group), buffer.numel()
    chunk = -(-numel // world)
    padded = buffer.new_zeros(world * chunk)
    padded[:numel] = buffer
    total = compressed_reduce_scatter(padded.view(world, chunk), group, state, key)
    total.div_(world)
    started = time.perf_counter()
    compressor = state.compressor
    slot = slot_nbytes(compressor, chunk, torch.float32, dense=False)
    send = torch.zeros(slot, dtype=torch.uint8, device=buffer.device)
    residual = state.residual(f"{key}/server", chunk, buffer.device)
    compressor.encode_into(total, residual, send)
    state.count_nonfinite(send[:8].view(torch.int64) > 0)
    gathered = send.new_empty(world * slot)
    _all_gather_single(gathered, send, group=group)
    gathered = gathered.view(world, slot)
    averaged = torch.zeros(world * chunk, dtype=torch.float32, device=buffer.device)
    for source in range(world):
        compressor.decode_from(gathered[source], averaged[source * chunk : (source + 1) * chunk])
    buffer.copy_(averaged[:numel])
    stats = state.recorded
    stats.wire_bytes += slot * (world - 1)
    stats.dense_bytes += chunk * buffer.element_size() * (world - 1)
    stats.seconds += time.perf_counter() - started
