"""Gradient compression: top-k, 8-bit block quantization, bitmap positions, error feedback.

Semantics (the pure-PyTorch reference below is the definition; the C++ and CUDA kernels in
``csrc/`` reproduce it bit for bit):

1. **Input.** ``e = float32(g) + float32(r)`` where ``g`` is the gradient (fp32, bf16 or fp16) and
   ``r`` the error-feedback residual (zero without one). A tensor is treated as flat: ``n`` entries.
2. **Selection.** ``k = ceil(density * n)`` entries with the largest ``|e|``; ties are broken by
   the lower index, so every rank selects the same entries for the same input.
   ``selection="sampled"`` estimates the threshold from ``m = min(n, max(1024, ceil(f * n)))``
   evenly spaced entries (positions ``i * n // m``), as Deep Gradient Compression does: the
   ``ceil(density * m)``-th largest sampled ``|e|`` is the threshold ``t`` and every entry with
   ``|e| >= t`` is kept. If that keeps fewer than ``floor((1 - tol) * k)`` or more than
   ``ceil((1 + tol) * k)`` entries, exact selection is used instead, so the kept count is always
   within ``tol * k`` (plus rounding) of ``k``.
3. **Quantization.** Entries are grouped in blocks of ``block_size`` consecutive positions. Block
   ``b`` gets one fp32 scale ``s_b = max_{i selected in b} |e_i| / Q`` with ``Q = 127`` (int8) or
   ``448`` (fp8 e4m3). A kept entry is stored as ``q_i = clamp(round_half_even(e_i / s_b), -127,
   127)`` (int8) or ``fp8_e4m3(clamp(e_i / s_b, -448, 448))`` (round to nearest even; the clamp
   only catches a rounding excess); ``q_i = 0`` where ``s_b = 0``. Signed zeros keep their sign.
   Decoding gives ``d_i = float32(q_i) * s_b`` for kept entries and ``0`` elsewhere, so each kept
   entry is off by at most half a quantization step of its block (``s_b / 2`` for int8).
4. **Positions** are a bitmap (bit ``i % 8`` of byte ``i // 8`` is entry ``i``), values follow in
   index order. A collective lays these parts out in a fixed-size slot that every rank can size
   in advance (:class:`SlotLayout`: a 16-byte head with the non-finite count, no header to parse
   on the host). As a standalone message with the 32-byte header the wire size is exactly
   ``nbytes = 32 + 4 * ceil(n / block_size) + ceil(n / 8) + count``: at density 0.15 with 8-bit
   values that is ``0.29 n`` bytes against ``4 n`` for fp32, a 13.7x reduction.
5. **Error feedback.** ``r <- e - d``. For an fp32 residual the identity ``d + r_new == e`` holds
   exactly (``d`` is within a factor 2 of ``e`` wherever it is non-zero, so the subtraction is
   exact), and summed over steps ``sum_t d_t = sum_t g_t + r_0 - r_T``: nothing is lost.
6. **Small tensors** (``n < min_numel``) are sent dense in the input dtype (the residual keeps the
   rounding, which is zero for fp32). **Empty tensors** encode to a bare header.
7. **NaN/Inf.** A non-finite ``e`` is never written into the residual: ``nonfinite="raise"``
   (default) raises :class:`NonFiniteError` and leaves the residual untouched; ``"skip"`` sends an
   all-zero message, leaves the residual untouched and counts the step in ``skipped_steps``.
   :meth:`GradientCompressor.encode_into` never raises and counts nothing on the host: it sets
   the slot's non-finite count, which the receiver and the collectives' statistics read.

Example:
    >>> import torch
    >>> compressor = GradientCompressor(density=0.25, block_size=8, min_numel=0)
    >>> message = compressor.compress(torch.tensor([0.1, -2.0, 0.3, 4.0, 0.0, 0.2, -0.1, 0.05]))
    >>> message.count, message.nbytes
    (2, 39)
    >>> compressor.decompress(message)  # -2 lands on its block's int8 grid, step 4/127
    tensor([ 0.0000, -2.0157,  0.0000,  4.0000,  0.0000,  0.0000,  0.0000,  0.0000])
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Literal

import torch

VALUE_FORMATS = ("int8", "fp8_e4m3")
QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}
HEADER_BYTES = 32
MAGIC = b"L3DC"
WIRE_VERSION = 1
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
# magic, version, value format, dtype, dense flag, numel, block size, count, flags
_HEADER = struct.Struct("<4sBBBBQIQI")
assert _HEADER.size == HEADER_BYTES
MIN_SAMPLE = 1024
SLOT_HEADER_BYTES = 16  # a slot's non-finite count (int64) and padding


class NonFiniteError(ValueError):
    """The tensor to compress holds NaN or Inf (after adding the residual)."""


@dataclass
class CompressedTensor:
    """One compressed tensor: what a collective sends, and how to decode it.

    Attributes:
        numel: number of entries of the original (flat) tensor.
        dtype: dtype of the original tensor (fp32, bf16 or fp16).
        block_size: entries per quantization block.
        value_format: ``"int8"`` or ``"fp8_e4m3"``.
        count: number of kept entries.
        scales: fp32 ``[ceil(numel / block_size)]``, one per block (0 where nothing is kept).
        bitmap: uint8 ``[ceil(numel / 8)]``; bit ``i % 8`` of byte ``i // 8`` marks entry i kept.
        values: uint8 ``[count]``, the raw int8/fp8 codes of the kept entries in index order.
        dense: the whole tensor in ``dtype`` when it was sent dense (then the others are empty).
        nonfinite: the sender's input held NaN/Inf and nothing was encoded: the message decodes
            to NaN everywhere (header flag bit 0), so a collective propagates it as an
            uncompressed one would.
    """

    numel: int
    dtype: torch.dtype
    block_size: int
    value_format: str
    count: int
    scales: torch.Tensor
    bitmap: torch.Tensor
    values: torch.Tensor
    dense: torch.Tensor | None = None
    nonfinite: bool = False

    @property
    def nbytes(self) -> int:
        """Exact size on the wire, header included (the length of :meth:`to_bytes`)."""
        if self.dense is not None:
            return HEADER_BYTES + self.numel * self.dense.element_size()
        return wire_nbytes(self.numel, self.block_size, self.count)

    @property
    def device(self) -> torch.device:
        return (self.dense if self.dense is not None else self.values).device

    def to_bytes(self) -> torch.Tensor:
        """Serialize into one contiguous uint8 tensor on the same device."""
        header = _HEADER.pack(
            MAGIC,
            WIRE_VERSION,
            VALUE_FORMATS.index(self.value_format),
            _DTYPE_CODES[self.dtype],
            int(self.dense is not None),
            self.numel,
            self.block_size,
            self.count,
            int(self.nonfinite),
        )
        head = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device)
        if self.dense is not None:
            return torch.cat([head, self.dense.reshape(-1).view(torch.uint8)])
        return torch.cat([head, self.scales.view(torch.uint8), self.bitmap, self.values])

    @classmethod
    def from_bytes(cls, buffer: torch.Tensor) -> CompressedTensor:
        """Parse a buffer made by :meth:`to_bytes` (views into ``buffer``, the body not copied)."""
        if buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise ValueError("a compressed buffer is a 1-D uint8 tensor")
        if buffer.numel() < HEADER_BYTES:
            raise ValueError(f"buffer of {buffer.numel()} bytes is shorter than the header")
        fields = _HEADER.unpack(bytes(buffer[:HEADER_BYTES].cpu().numpy()))
        magic, version, fmt, dtype_code, dense, numel, block_size, count, flags = fields
        if magic != MAGIC or version != WIRE_VERSION:
            raise ValueError(f"not a lightning-3d compressed buffer (magic {magic!r}, v{version})")
        dtype, value_format = _CODE_DTYPES[dtype_code], VALUE_FORMATS[fmt]
        dense_bytes = HEADER_BYTES + numel * torch.finfo(dtype).bits // 8
        expected = dense_bytes if dense else wire_nbytes(numel, block_size, count)
        if buffer.numel() != expected:
            raise ValueError(f"buffer has {buffer.numel()} bytes, its header says {expected}")
        body = buffer[HEADER_BYTES:expected]
        if dense:
            empty = buffer.new_empty(0)
            payload = body.view(dtype)
            return cls(numel, dtype, block_size, value_format, numel, empty, empty, empty, payload)
        blocks, bitmap_bytes = -(-numel // block_size), -(-numel // 8)
        scales = body[: 4 * blocks].view(torch.float32)
        bitmap = body[4 * blocks : 4 * blocks + bitmap_bytes]
        values = body[4 * blocks + bitmap_bytes :]
        return cls(
            numel,
            dtype,
            block_size,
            value_format,
            count,
            scales,
            bitmap,
            values,
            None,
            bool(flags & 1),
        )


def wire_nbytes(numel: int, block_size: int, count: int) -> int:
    """Wire size of a sparse message: header + fp32 scales + bitmap + one byte per kept entry."""
    return HEADER_BYTES + 4 * -(-numel // block_size) + -(-numel // 8) + count


# --------------------------------------------------------------------------------------------
# Reference implementation: readable PyTorch, the oracle for the kernels
# --------------------------------------------------------------------------------------------
def sample_positions(numel: int, sample_count: int, device: torch.device) -> torch.Tensor:
    """Evenly spaced sample positions ``i * numel // sample_count`` for ``i < sample_count``.

    Computed as ``i * (n // m) + i * (n % m) // m``, which is equal but cannot overflow int64.
    """
    index = torch.arange(sample_count, device=device, dtype=torch.int64)
    quotient, remainder = divmod(numel, sample_count)
    return index * quotient + index * remainder // sample_count


def selection_counts(numel: int, density: float, tolerance: float) -> tuple[int, int, int]:
    """``k = ceil(density * n)`` and the accepted range ``[floor((1-tol)k), ceil((1+tol)k)]``."""
    k = math.ceil(density * numel)
    return k, math.floor((1.0 - tolerance) * k), math.ceil((1.0 + tolerance) * k)


def reference_select(
    magnitude: torch.Tensor, density: float, sample_count: int, tolerance: float
) -> torch.Tensor:
    """Boolean mask of the kept entries of ``magnitude = |e|`` (see the module docstring)."""
    numel = magnitude.numel()
    k, low, high = selection_counts(numel, density, tolerance)
    if sample_count:
        sample = magnitude[sample_positions(numel, sample_count, magnitude.device)]
        sample_k = math.ceil(density * sample_count)
        threshold = torch.sort(sample, descending=True).values[sample_k - 1]
        mask = magnitude >= threshold
        if low <= int(mask.sum()) <= high:
            return mask
    order = torch.sort(magnitude, descending=True, stable=True).indices  # ties: lower index first
    mask = torch.zeros(numel, dtype=torch.bool, device=magnitude.device)
    mask[order[:k]] = True
    return mask


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean vector into bytes, entry ``i`` at bit ``i % 8`` of byte ``i // 8``."""
    padded = torch.zeros(-(-mask.numel() // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[: mask.numel()] = mask.to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(bitmap: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits as a boolean vector."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmap.device)
    return ((bitmap.view(-1, 1) >> shifts) & 1).view(-1)[:numel].bool()


def encode_values(values: torch.Tensor, scales: torch.Tensor, value_format: str) -> torch.Tensor:
    """8-bit codes (as raw uint8) of fp32 ``values`` with per-value ``scales`` (0 -> code 0)."""
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    ratio = torch.where(scales > 0, values / safe, torch.zeros_like(values))
    if value_format == "int8":
        return torch.round(ratio).clamp(-127, 127).to(torch.int8).view(torch.uint8)
    # Clamped to the largest finite float8 before the cast: |ratio| <= 448 up to rounding, and
    # casts beyond it saturate in some torch versions and give NaN in others.
    limit = QMAX["fp8_e4m3"]
    return ratio.clamp(-limit, limit).to(torch.float8_e4m3fn).view(torch.uint8)


def decode_values(codes: torch.Tensor, scales: torch.Tensor, value_format: str) -> torch.Tensor:
    """fp32 values of raw 8-bit ``codes`` with per-value ``scales``."""
    dtype = torch.int8 if value_format == "int8" else torch.float8_e4m3fn
    return codes.view(dtype).to(torch.float32) * scales


def reference_encode(
    grad: torch.Tensor,
    residual: torch.Tensor | None,
    density: float,
    block_size: int,
    value_format: str,
    sample_count: int,
    tolerance: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Encode ``e = grad + residual`` and, if ``residual`` is given, set it to ``e - decode``.

    Returns ``(scales, bitmap, values, nonfinite)``. When ``nonfinite > 0`` nothing is encoded
    and the residual is left untouched.
    """
    flat = grad.reshape(-1).float()
    e = flat + residual.reshape(-1).float() if residual is not None else flat
    nonfinite = int((~torch.isfinite(e)).sum())
    blocks = -(-e.numel() // block_size)
    if nonfinite:
        empty = torch.empty(0, dtype=torch.uint8, device=e.device)
        return torch.empty(0, device=e.device), empty, empty, nonfinite
    mask = reference_select(e.abs(), density, sample_count, tolerance)
    positions = mask.nonzero().view(-1)
    kept = e[positions]
    block_of = positions // block_size
    block_max = torch.zeros(blocks, dtype=torch.float32, device=e.device)
    block_max.scatter_reduce_(0, block_of, kept.abs(), reduce="amax")
    # Divide by a tensor, not a Python scalar: CUDA turns a scalar division into a multiplication
    # by the reciprocal, which rounds differently from the kernels' true division.
    scales = block_max / torch.full_like(block_max, QMAX[value_format])
    codes = encode_values(kept, scales[block_of], value_format)
    if residual is not None:
        decoded = torch.zeros_like(e)
        decoded[positions] = decode_values(codes, scales[block_of], value_format)
        residual.copy_((e - decoded).view_as(residual))
    return scales, pack_bits(mask), codes, 0


def reference_decode(message: CompressedTensor, out: torch.Tensor, accumulate: bool) -> None:
    """Write (or add, with ``accumulate``) the decoded message into the flat float ``out``."""
    reference_decode_parts(
        message.scales,
        message.bitmap,
        message.values,
        message.block_size,
        message.value_format,
        out,
        accumulate,
    )


def reference_decode_parts(
    scales: torch.Tensor,
    bitmap: torch.Tensor,
    values: torch.Tensor,
    block_size: int,
    value_format: str,
    out: torch.Tensor,
    accumulate: bool,
) -> None:
    """:func:`reference_decode` on a message's parts; ``values`` may hold unused room at its end
    (a fixed-size slot), only the first as many as the bitmap marks are read."""
    numel = out.numel()
    positions = unpack_bits(bitmap, numel).nonzero().view(-1)
    if positions.numel() > values.numel():
        raise ValueError(
            f"the bitmap marks {positions.numel()} entries but the message holds "
            f"{values.numel()} values (a damaged message)"
        )
    decoded = torch.zeros(numel, dtype=torch.float32, device=out.device)
    codes = values[: positions.numel()]
    decoded[positions] = decode_values(codes, scales[positions // block_size], value_format)
    out.copy_(out.float() + decoded if accumulate else decoded)  # accumulate in fp32, then round


_POPCOUNT = torch.tensor([bin(byte).count("1") for byte in range(256)], dtype=torch.int64)


def marked_entries(bitmap: torch.Tensor, numel: int) -> torch.Tensor:
    """How many of the first ``numel`` bits of ``bitmap`` are set (a 0-d tensor on its device)."""
    counts = _POPCOUNT.to(bitmap.device)[bitmap.long()]
    if numel % 8:
        last = bitmap[-1:].long() & ((1 << (numel % 8)) - 1)
        counts = torch.cat([counts[:-1], _POPCOUNT.to(bitmap.device)[last]])
    return counts.sum()


@dataclass(frozen=True)
class SlotLayout:
    """Where the parts of one fixed-size message lie in a collective's send slot.

    Every rank computes the same layout from ``(numel, dtype, dense)`` and the compressor's
    settings, so a receiver finds each part without reading a header on the host:

    ``[0, 8)`` int64 count of non-finite input entries (0 for a good message) | ``[8, 16)``
    padding | then either the dense payload (``numel`` entries of ``dtype``) or the fp32 block
    scales, the bitmap and ``capacity`` bytes of values (``k`` for exact selection, the most a
    sampled selection may keep otherwise). The total is rounded up to 16 bytes.

    Example:
        >>> layout = GradientCompressor(density=0.25, block_size=8, min_numel=0).slot_layout(
        ...     64, torch.float32
        ... )
        >>> layout.scales_offset, layout.bitmap_offset, layout.values_offset, layout.nbytes
        (16, 48, 56, 80)
    """

    numel: int
    dtype: torch.dtype
    dense: bool
    block_size: int
    capacity: int

    scales_offset = SLOT_HEADER_BYTES

    @property
    def blocks(self) -> int:
        return -(-self.numel // self.block_size)

    @property
    def bitmap_offset(self) -> int:
        return self.scales_offset + 4 * self.blocks

    @property
    def values_offset(self) -> int:
        return self.bitmap_offset + -(-self.numel // 8)

    @property
    def nbytes(self) -> int:
        """Slot size: every part, rounded up to 16 bytes (so slots stay aligned in a buffer)."""
        if self.dense:
            end = SLOT_HEADER_BYTES + self.numel * torch.finfo(self.dtype).bits // 8
        else:
            end = self.values_offset + self.capacity
        return -(-end // SLOT_HEADER_BYTES) * SLOT_HEADER_BYTES

    def views(self, slot: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(nonfinite, payload)`` for a dense slot, ``(nonfinite, scales, bitmap, values)``
        otherwise: views into ``slot`` (1-D uint8, 16-byte aligned, at least :attr:`nbytes`)."""
        if slot.dtype != torch.uint8 or slot.dim() != 1 or slot.numel() < self.nbytes:
            raise ValueError(
                f"a slot is a 1-D uint8 tensor of at least {self.nbytes} bytes, got "
                f"{slot.dtype} of shape {tuple(slot.shape)}"
            )
        nonfinite = slot[:8].view(torch.int64)
        if self.dense:
            size = self.numel * torch.finfo(self.dtype).bits // 8
            return nonfinite, slot[SLOT_HEADER_BYTES : SLOT_HEADER_BYTES + size].view(self.dtype)
        return (
            nonfinite,
            slot[self.scales_offset : self.bitmap_offset].view(torch.float32),
            slot[self.bitmap_offset : self.values_offset],
            slot[self.values_offset : self.values_offset + self.capacity],
        )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
Backend = Literal["auto", "reference", "cpp", "cuda"]


@dataclass
class GradientCompressor:
    """Top-k + 8-bit block quantization with bitmap positions (semantics in the module docstring).

    Args:
        density: fraction of entries kept, in (0, 1].
        bits: bits per kept value; 8 is the one supported width.
        block_size: entries per quantization block, a power of two in [8, 65536].
        value_format: ``"int8"`` (uniform, scale = max/127) or ``"fp8_e4m3"`` (scale = max/448).
        selection: ``"exact"`` top-k, or ``"sampled"`` threshold estimation.
        sample_fraction: share of entries sampled for ``"sampled"`` (at least 1024 are).
        tolerance: ``"sampled"`` falls back to exact when the kept count is off by more than
            ``tolerance * k``.
        min_numel: tensors with fewer entries are sent dense (exact, in their own dtype).
        nonfinite: ``"raise"`` or ``"skip"`` on NaN/Inf (see the module docstring).
        backend: ``"auto"`` (the compiled kernels for the tensor's device when they load, else the
            reference), or one of ``"reference"``, ``"cpp"``, ``"cuda"``.

    Example:
        >>> compressor = GradientCompressor(density=0.15)
        >>> compressor.compress(torch.randn(1 << 16)).nbytes < 4 * (1 << 16) / 12
        True
    """

    density: float = 0.15
    bits: int = 8
    block_size: int = 256
    value_format: str = "int8"
    selection: str = "exact"
    sample_fraction: float = 0.01
    tolerance: float = 0.1
    min_numel: int = 4096
    nonfinite: str = "raise"
    backend: Backend = "auto"
    skipped_steps: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.bits != 8:
            raise ValueError(f"bits={self.bits} is not supported; the supported width is 8")
        size = self.block_size
        if not (isinstance(size, int) and 8 <= size <= 65536 and size & (size - 1) == 0):
            raise ValueError(f"block_size must be a power of two in [8, 65536], got {size}")
        if self.value_format not in VALUE_FORMATS:
            raise ValueError(
                f"value_format must be one of {VALUE_FORMATS}, got {self.value_format!r}"
            )
        if self.selection not in ("exact", "sampled"):
            raise ValueError(f"selection must be 'exact' or 'sampled', got {self.selection!r}")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {self.sample_fraction}")
        if not 0.0 <= self.tolerance < 1.0:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")
        if self.min_numel < 0:
            raise ValueError(f"min_numel must be >= 0, got {self.min_numel}")
        if self.nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {self.nonfinite!r}")
        if self.backend not in ("auto", "reference", "cpp", "cuda"):
            raise ValueError(
                f"backend must be 'auto', 'reference', 'cpp' or 'cuda', got {self.backend!r}"
            )

    def sample_count(self, numel: int) -> int:
        """Entries sampled for threshold estimation (0 for exact selection)."""
        if self.selection == "exact":
            return 0
        return min(numel, max(MIN_SAMPLE, math.ceil(self.sample_fraction * numel)))

    def backend_for(self, device: torch.device) -> str:
        """The backend that runs on ``device`` (``"reference"`` when no kernels are loaded)."""
        from lightning_3d import ops

        if self.backend == "auto":
            return ops.backend(device)
        if self.backend != "reference":
            ops.require(self.backend, device)
        return self.backend

    def compress(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, dense: bool = False
    ) -> CompressedTensor:
        """Compress ``x + residual``; with a residual, set it to what was not sent.

        ``dense=True`` sends ``x + residual`` whole in ``x``'s dtype, as for small tensors (a
        warm-up step uses it).

        Raises:
            NonFiniteError: ``x + residual`` holds NaN/Inf and ``nonfinite="raise"``.
        """
        if x.dtype not in _DTYPE_CODES:
            raise TypeError(f"can compress float32, bfloat16 or float16 tensors, not {x.dtype}")
        self._check_residual(x, residual)
        numel = x.numel()
        if dense or numel < max(self.min_numel, 1):
            return self._dense(x, residual)
        flat = x.reshape(-1)
        args = (self.density, self.block_size, self.value_format, self.sample_count(numel))
        backend = self.backend_for(x.device)
        if backend == "reference":
            scales, bitmap, values, nonfinite = reference_encode(
                flat, residual, *args, self.tolerance
            )
        else:
            from lightning_3d import ops

            scales, bitmap, values, nonfinite = ops.encode(flat, residual, *args, self.tolerance)
        if nonfinite:
            return self._nonfinite(x, nonfinite)
        return CompressedTensor(
            numel,
            x.dtype,
            self.block_size,
            self.value_format,
            values.numel(),
            scales,
            bitmap,
            values,
        )

    def decompress(
        self, message: CompressedTensor, out: torch.Tensor | None = None, accumulate: bool = False
    ) -> torch.Tensor:
        """Decode ``message`` into ``out`` (a new flat tensor of the original dtype by default).

        With ``accumulate=True`` the decoded values are added to ``out`` (in fp32, then rounded
        to ``out``'s dtype), which is how a receiver sums messages from several ranks.
        """
        if out is None:
            out = torch.zeros(message.numel, dtype=message.dtype, device=message.device)
            accumulate = False
        if out.numel() != message.numel:
            raise ValueError(f"out has {out.numel()} entries, the message {message.numel}")
        flat = out.view(-1)
        if message.nonfinite:
            flat.fill_(float("nan"))
        elif message.dense is not None:
            dense = message.dense.reshape(-1).float()
            flat.copy_(flat.float() + dense if accumulate else dense)
        elif message.numel:
            # A whole message is checked here, on the host; a slot's decode cannot afford that
            # round trip, so the kernels turn entries past the values into NaN instead.
            marked = int(marked_entries(message.bitmap, message.numel))
            if marked != message.values.numel():
                raise ValueError(
                    f"the bitmap marks {marked} entries but the message holds "
                    f"{message.values.numel()} values (a damaged message)"
                )
            backend = self.backend_for(flat.device)
            if backend == "reference":
                reference_decode(message, flat, accumulate)
            else:
                from lightning_3d import ops

                ops.decode_parts(
                    message.scales,
                    message.bitmap,
                    message.values,
                    message.block_size,
                    message.value_format,
                    flat,
                    accumulate,
                )
        return out

    def slot_layout(self, numel: int, dtype: torch.dtype, dense: bool = False) -> SlotLayout:
        """The fixed layout of :meth:`encode_into` for ``numel`` entries of ``dtype``.

        Small tensors (``numel < min_numel``) and ``dense=True`` get a dense slot.
        """
        if dtype not in _DTYPE_CODES:
            raise TypeError(f"can compress float32, bfloat16 or float16 tensors, not {dtype}")
        dense = dense or numel < max(self.min_numel, 1)
        k, _, most = selection_counts(numel, self.density, self.tolerance)
        capacity = 0 if dense else (k if self.selection == "exact" else min(numel, most))
        return SlotLayout(numel, dtype, dense, self.block_size, capacity)

    def encode_into(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        slot: torch.Tensor,
        dense: bool = False,
    ) -> None:
        """Compress ``x + residual`` into ``slot`` (layout :meth:`slot_layout`); what a collective
        sends. With a residual, set it to what was not sent.

        Unlike :meth:`compress` this never raises and never waits for the device: NaN/Inf in
        ``x + residual`` only set the slot's non-finite count (its scales, bitmap or payload are
        zeros and the residual is left as it was), which :meth:`decode_from` reads on the device.
        With exact selection on CUDA no step of the encode synchronizes with the host; sampled
        selection decides its fallback on the host.
        """
        layout = self.slot_layout(x.numel(), x.dtype, dense)
        nonfinite, *parts = layout.views(slot)
        self._check_residual(x, residual)
        if layout.dense:
            self._dense_into(x, residual, nonfinite, parts[0])
            return
        scales, bitmap, values = parts
        flat = x.reshape(-1)
        backend = self.backend_for(x.device)
        from lightning_3d import ops

        if backend == "cuda" and self.selection == "exact":
            ops.encode_into(
                flat,
                residual,
                layout.capacity,
                self.block_size,
                self.value_format,
                scales,
                bitmap,
                values,
                nonfinite,
            )
            return
        args = (self.density, self.block_size, self.value_format, self.sample_count(x.numel()))
        encode = reference_encode if backend == "reference" else ops.encode
        encoded_scales, encoded_bitmap, codes, bad = encode(flat, residual, *args, self.tolerance)
        nonfinite.fill_(bad)
        if bad:
            scales.zero_()
            bitmap.zero_()
            return
        scales.copy_(encoded_scales)
        bitmap.copy_(encoded_bitmap)
        values[: codes.numel()].copy_(codes)

    def decode_from(
        self,
        slot: torch.Tensor,
        out: torch.Tensor,
        dtype: torch.dtype | None = None,
        accumulate: bool = False,
        dense: bool = False,
    ) -> None:
        """Decode a slot written by :meth:`encode_into` into ``out`` (or add it, with
        ``accumulate``), without reading anything on the host.

        ``dtype`` is the sender's input dtype (``out``'s by default). A slot flagged non-finite
        adds nothing; with ``nonfinite="raise"`` it turns ``out`` into NaN (as an uncompressed
        reduction of NaN would), with ``"skip"`` it is left out.
        """
        layout = self.slot_layout(out.numel(), dtype or out.dtype, dense)
        nonfinite, *parts = layout.views(slot)
        flat = out.view(-1)
        if layout.dense:
            payload = parts[0].float()
            flat.copy_(flat.float() + payload if accumulate else payload)
        else:
            scales, bitmap, values = parts
            backend = self.backend_for(flat.device)
            if backend == "reference":
                reference_decode_parts(
                    scales, bitmap, values, self.block_size, self.value_format, flat, accumulate
                )
            else:
                from lightning_3d import ops

                ops.decode_parts(
                    scales, bitmap, values, self.block_size, self.value_format, flat, accumulate
                )
        if self.nonfinite == "raise":
            flat.masked_fill_(nonfinite > 0, float("nan"))

    def _dense_into(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        nonfinite: torch.Tensor,
        payload: torch.Tensor,
    ) -> None:
        e = x.reshape(-1).float()
        if residual is not None:
            e = e + residual.reshape(-1).float()
        bad = (~torch.isfinite(e)).sum(dtype=torch.int64).view(1)
        nonfinite.copy_(bad)
        good = bad == 0
        dense = e.to(x.dtype)
        payload.copy_(torch.where(good, dense, torch.zeros_like(dense)))
        if residual is not None:
            kept = torch.where(good, e - dense.float(), residual.reshape(-1).float())
            residual.copy_(kept.view_as(residual))

    @staticmethod
    def _check_residual(x: torch.Tensor, residual: torch.Tensor | None) -> None:
        if residual is not None and (
            residual.numel() != x.numel() or residual.dtype not in (torch.float32, torch.bfloat16)
        ):
            raise ValueError("the residual must be fp32 or bf16 with as many entries as the input")

    def _empty(self, numel: int, dtype: torch.dtype, device: torch.device) -> CompressedTensor:
        return CompressedTensor(
            numel,
            dtype,
            self.block_size,
            self.value_format,
            0,
            torch.zeros(-(-numel // self.block_size), dtype=torch.float32, device=device),
            torch.zeros(-(-numel // 8), dtype=torch.uint8, device=device),
            torch.empty(0, dtype=torch.uint8, device=device),
        )

    def _dense(self, x: torch.Tensor, residual: torch.Tensor | None) -> CompressedTensor:
        e = x.reshape(-1).float()
        if residual is not None:
            e = e + residual.reshape(-1).float()
        nonfinite = int((~torch.isfinite(e)).sum())
        if nonfinite:
            return self._nonfinite(x, nonfinite)
        dense = e.to(x.dtype)
        if residual is not None:
            residual.copy_((e - dense.float()).view_as(residual))
        empty = x.new_empty(0, dtype=torch.uint8)
        numel = x.numel()
        return CompressedTensor(
            numel, x.dtype, self.block_size, self.value_format, numel, empty, empty, empty, dense
        )

    def _nonfinite(self, x: torch.Tensor, count: int) -> CompressedTensor:
        if self.nonfinite == "raise":
            raise NonFiniteError(
                f"{count} of {x.numel()} entries to compress are NaN or Inf; the residual was left "
                "unchanged (pass nonfinite='skip' to send zeros and count the step instead)"
            )
        self.skipped_steps += 1
        return self._empty(x.numel(), x.dtype, x.device)


class ErrorFeedback:
    """Error-feedback state for one tensor: ``e = g + r; c = compress(e); r = e - decompress(c)``.

    Args:
        compressor: the :class:`GradientCompressor` to use.
        residual_dtype: ``torch.float32`` (exact identity) or ``torch.bfloat16`` (half the memory;
            the residual is rounded to bf16 each step).

    Example:
        >>> feedback = ErrorFeedback(GradientCompressor(density=0.1, min_numel=0))
        >>> message = feedback.step(torch.randn(4096))
        >>> float(feedback.residual.norm()) > 0
        True
    """

    def __init__(
        self, compressor: GradientCompressor, residual_dtype: torch.dtype = torch.float32
    ) -> None:
        if residual_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"residual_dtype must be float32 or bfloat16, got {residual_dtype}")
        self.compressor = compressor
        self.residual_dtype = residual_dtype
        self.residual: torch.Tensor | None = None

    def step(self, grad: torch.Tensor) -> CompressedTensor:
        """Compress ``grad`` plus the carried residual and keep what was not sent."""
        if self.residual is None:
            self.residual = torch.zeros(grad.numel(), dtype=self.residual_dtype, device=grad.device)
        elif self.residual.numel() != grad.numel():
            raise ValueError(
                f"this error-feedback state holds {self.residual.numel()} entries, got a gradient "
                f"with {grad.numel()}"
            )
        return self.compressor.compress(grad, self.residual)

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"residual": self.residual}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        residual = state["residual"]
        self.residual = None if residual is None else residual.to(self.residual_dtype).clone()
