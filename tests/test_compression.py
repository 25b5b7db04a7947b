"""Compression core: the C++ kernels against the reference, and the format's guarantees."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_3d import ops
from lightning_3d.compression import (
    CompressedTensor,
    ErrorFeedback,
    GradientCompressor,
    NonFiniteError,
    selection_counts,
    unpack_bits,
    wire_nbytes,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
KERNEL_BACKEND = {"cpu": "cpp", "cuda": "cuda"}
BACKENDS = ["reference", "cpp"] + (["cuda"] if HAS_CUDA else [])
BACKEND_DEVICE = {"reference": "cpu", "cpp": "cpu", "cuda": "cuda"}
KERNEL_BACKENDS = [backend for backend in BACKENDS if backend != "reference"]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, on the CPU: equal bits, not just equal values (-0.0 is
    not 0.0 here, and NaN payloads count)."""
    integer = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[tensor.element_size()]
    return tensor.detach().cpu().view(integer)


def _encode_both(x, residual, device, **options):
    """Compress the same input with the reference and the kernels; return both results."""
    results = {}
    for backend in ("reference", KERNEL_BACKEND[device]):
        compressor = GradientCompressor(backend=backend, min_numel=0, **options)
        r = None if residual is None else residual.clone()
        message = compressor.compress(x, r)
        results[backend] = (message, r, compressor.decompress(message))
    return results["reference"], results[KERNEL_BACKEND[device]]


def test_cpu_uses_the_compiled_kernels() -> None:
    assert ops.backend("cpu") == "cpp"
    assert GradientCompressor().backend_for(torch.device("cpu")) == "cpp"


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    numel=st.integers(1, 3000),
    block_size=st.sampled_from([8, 16, 64, 256, 1024]),
    density=st.floats(0.01, 1.0),
    dtype=st.sampled_from(DTYPES),
    residual_dtype=st.sampled_from([None, torch.float32, torch.bfloat16]),
    value_format=st.sampled_from(["int8", "fp8_e4m3"]),
    selection=st.sampled_from(["exact", "sampled"]),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernels_equal_the_reference(
    device, numel, block_size, density, dtype, residual_dtype, value_format, selection, ties, seed
) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=generator)
    if ties:  # many equal magnitudes: tie-breaking decides
        x = torch.sign(x) * torch.randint(0, 3, (numel,), generator=generator).float()
    x = x.to(dtype).to(device)
    residual = None
    if residual_dtype is not None:
        residual = (0.1 * torch.randn(numel, generator=generator)).to(residual_dtype).to(device)
    options = {
        "density": density,
        "block_size": block_size,
        "value_format": value_format,
        "selection": selection,
        "sample_fraction": 0.05,
    }
    (ref, ref_r, ref_out), (ker, ker_r, ker_out) = _encode_both(x, residual, device, **options)
    assert ker.count == ref.count
    assert torch.equal(ker.bitmap, ref.bitmap)
    assert torch.equal(ker.values, ref.values)
    assert torch.equal(bits(ker.scales), bits(ref.scales))
    assert torch.equal(bits(ker_out), bits(ref_out))  # signed zeros included (ties make -0.0)
    if residual is not None:
        assert torch.equal(bits(ker_r), bits(ref_r))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value_format", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("selection", ["exact", "sampled"])
def test_cuda_equals_cpp_bit_for_bit_on_a_large_tensor(selection, value_format, dtype) -> None:
    numel = 3 * 2**20 + 5  # many CUDA grid strides, a partial last block and bitmap byte
    generator = torch.Generator().manual_seed(11)
    x = (torch.randn(numel, generator=generator) ** 3).to(dtype)
    residual = 0.1 * torch.randn(numel, generator=generator)
    base = torch.randn(numel, generator=generator)
    results = {}
    for backend in ("cpp", "cuda"):
        device = BACKEND_DEVICE[backend]
        compressor = GradientCompressor(
            backend=backend, selection=selection, value_format=value_format
        )
        r = residual.clone().to(device)  # each backend starts from the same residual
        message = compressor.compress(x.to(device), r)
        summed = compressor.decompress(message, out=base.clone().to(device), accumulate=True)
        results[backend] = (message, r, compressor.decompress(message), summed)
    (cpu, cpu_r, cpu_out, cpu_sum), (gpu, gpu_r, gpu_out, gpu_sum) = results["cpp"], results["cuda"]
    assert gpu.count == cpu.count
    for name in ("scales", "bitmap", "values"):
        assert torch.equal(bits(getattr(gpu, name)), bits(getattr(cpu, name)))
    assert torch.equal(bits(gpu_r), bits(cpu_r))
    assert torch.equal(bits(gpu_out), bits(cpu_out))
    assert torch.equal(bits(gpu_sum), bits(cpu_sum))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value_format", ["int8", "fp8_e4m3"])
def test_exact_topk_and_reconstruction_error(backend, value_format) -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(1)) * torch.linspace(
        0.1, 3, 10_000
    )
    x[100:140] = 0.0  # an all-zero stretch
    x = x.to(BACKEND_DEVICE[backend])
    compressor = GradientCompressor(
        density=0.15, block_size=64, value_format=value_format, backend=backend
    )
    message = compressor.compress(x)
    kept = unpack_bits(message.bitmap, x.numel())
    k, _, _ = selection_counts(x.numel(), 0.15, 0.0)
    assert message.count == int(kept.sum()) == k
    assert x[kept].abs().min() >= x[~kept].abs().max()
    decoded = compressor.decompress(message)
    assert torch.all(decoded[~kept] == 0)
    scales = message.scales.repeat_interleave(64)[: x.numel()]
    error = (decoded - x)[kept].abs()
    if value_format == "int8":  # half a quantization step of the block
        assert torch.all(error <= half_step(scales[kept], x[kept]))
    else:  # e4m3 keeps 3 mantissa bits: half an ulp is 1/16 relative (1/2**10 * scale subnormal)
        assert torch.all(error <= x[kept].abs() / 16 + scales[kept] * 2**-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_are_broken_by_lower_index(backend) -> None:
    x = torch.tensor(
        [1.0, 3.0, -2.0, 2.0, 2.0, -2.0, 0.5, 2.0] * 1024, device=BACKEND_DEVICE[backend]
    )
    message = GradientCompressor(density=0.2, min_numel=0, backend=backend).compress(x)
    kept = unpack_bits(message.bitmap, x.numel()).nonzero().view(-1)
    k = math.ceil(0.2 * x.numel())  # 1639: all 1024 threes, then the first 615 twos by index
    twos = (x.abs() == 2).nonzero().view(-1)[: k - 1024]
    expected = torch.sort(torch.cat([(x == 3).nonzero().view(-1), twos])).values
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_selection_stays_within_tolerance(backend) -> None:
    compressor = GradientCompressor(selection="sampled", tolerance=0.05, backend=backend)
    for seed in range(5):
        x = torch.randn(200_000, generator=torch.Generator().manual_seed(seed)) ** 3
        x = x.to(BACKEND_DEVICE[backend])
        count = compressor.compress(x).count
        _, low, high = selection_counts(x.numel(), 0.15, 0.05)
        assert low <= count <= high


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_error_feedback_identity_and_nothing_lost(backend, dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    feedback = ErrorFeedback(GradientCompressor(density=0.1, block_size=128, backend=backend))
    sent = torch.zeros(20_000, dtype=torch.float64)
    total = torch.zeros(20_000, dtype=torch.float64)
    device = BACKEND_DEVICE[backend]
    for _ in range(30):
        grad = torch.randn(20_000, generator=generator).to(dtype).to(device)
        before = (
            feedback.residual.clone()
            if feedback.residual is not None
            else torch.zeros(20_000, device=device)
        )
        e = grad.float() + before
        message = feedback.step(grad)
        decoded = feedback.compressor.decompress(message, out=torch.zeros(20_000, device=device))
        assert torch.equal(decoded + feedback.residual, e)  # exact in fp32
        sent += decoded.double().cpu()
        total += grad.double().cpu()
    lost = sent - (total - feedback.residual.double().cpu())
    assert lost.abs().max() < 1e-5  # only the rounding of the fp32 additions g + r


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value_format", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("numel", [4096, 5000, 1 << 16])
def test_wire_size_formula_and_byte_round_trip(backend, value_format, numel) -> None:
    compressor = GradientCompressor(value_format=value_format, backend=backend)
    message = compressor.compress(torch.randn(numel, device=BACKEND_DEVICE[backend]))
    buffer = message.to_bytes()
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1
    assert buffer.numel() == message.nbytes == wire_nbytes(numel, 256, message.count)
    assert message.nbytes == 32 + 4 * math.ceil(numel / 256) + math.ceil(numel / 8) + message.count
    parsed = CompressedTensor.from_bytes(buffer)
    for name in ("numel", "dtype", "block_size", "value_format", "count"):
        assert getattr(parsed, name) == getattr(message, name)
    for name in ("scales", "bitmap", "values"):
        assert torch.equal(getattr(parsed, name), getattr(message, name))
    assert torch.equal(compressor.decompress(parsed), compressor.decompress(message))
    assert message.nbytes <= 4 * numel / 12


@pytest.mark.parametrize("numel", [100, 5000])  # dense and sparse
def test_damaged_buffers_are_refused(numel) -> None:
    buffer = GradientCompressor().compress(torch.randn(numel)).to_bytes()
    with pytest.raises(ValueError, match=f"buffer has {buffer.numel() - 1} bytes, its header says"):
        CompressedTensor.from_bytes(buffer[:-1])
    forged = buffer.clone()
    forged[:4] = torch.tensor(list(b"XXXX"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="not a lightning-3d compressed buffer"):
        CompressedTensor.from_bytes(forged)


def _damage_bitmap(buffer: torch.Tensor, numel: int, fill: int) -> torch.Tensor:
    """A copy of a sparse message (block size 256) whose whole bitmap is ``fill``."""
    damaged = buffer.clone()
    start = 32 + 4 * math.ceil(numel / 256)
    damaged[start : start + math.ceil(numel / 8)] = fill
    return damaged


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("fill", "marked"), [(0xFF, 5000), (0x00, 0)])
def test_bitmap_disagreeing_with_the_values_is_refused(backend, fill, marked) -> None:
    compressor = GradientCompressor(backend=backend)
    message = compressor.compress(torch.randn(5000, device=BACKEND_DEVICE[backend]))
    # The lengths still agree with the header, so parsing succeeds: decompress is the guard.
    damaged = CompressedTensor.from_bytes(_damage_bitmap(message.to_bytes(), 5000, fill))
    expected = f"bitmap marks {marked} entries but the message holds {message.count} values"
    with pytest.raises((ValueError, RuntimeError), match=expected):
        compressor.decompress(damaged)
    out = torch.zeros(5000, device=BACKEND_DEVICE[backend])
    with pytest.raises((ValueError, RuntimeError), match=expected):
        compressor.decompress(damaged, out=out, accumulate=True)
    assert not out.any()  # refused before anything was written


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_bits_of_the_bitmap_are_ignored(backend) -> None:
    compressor = GradientCompressor(density=0.5, backend=backend)
    message = compressor.compress(torch.randn(5001, device=BACKEND_DEVICE[backend]))
    buffer = message.to_bytes()
    padded = buffer.clone()
    last = 32 + 4 * math.ceil(5001 / 256) + 5001 // 8  # the byte holding entry 5000 only
    padded[last] |= 0xFE
    parsed = CompressedTensor.from_bytes(padded)
    assert torch.equal(compressor.decompress(parsed), compressor.decompress(message))


def test_default_wire_ratio_at_one_million_entries() -> None:
    message = GradientCompressor().compress(torch.randn(1 << 20))
    assert 4 * (1 << 20) / message.nbytes >= 12


def half_step(scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Half an int8 step, plus the fp32 rounding of decoding ``q * s`` and of the difference
    (an entry exactly between two codes is off by half a step before rounding)."""
    return scales / 2 + 2 * torch.finfo(torch.float32).eps * x.abs()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 65, 194])  # 65 and 194 hold entries halfway between codes
def test_density_one_keeps_everything(backend, seed) -> None:
    x = torch.randn(5000, generator=torch.Generator().manual_seed(seed))
    x = x.to(BACKEND_DEVICE[backend])
    compressor = GradientCompressor(density=1.0, block_size=32, backend=backend)
    message = compressor.compress(x)
    assert message.count == 5000
    assert bool(unpack_bits(message.bitmap, 5000).all())
    step = message.scales.repeat_interleave(32)[:5000]
    assert torch.all((compressor.decompress(message) - x).abs() <= half_step(step, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_input(backend) -> None:
    device = BACKEND_DEVICE[backend]
    residual = torch.zeros(4096, device=device)
    compressor = GradientCompressor(backend=backend)
    message = compressor.compress(torch.zeros(4096, device=device), residual)
    assert torch.equal(message.scales.cpu(), torch.zeros(16))
    assert torch.equal(message.values.cpu(), torch.zeros(message.count, dtype=torch.uint8))
    assert torch.equal(compressor.decompress(message).cpu(), torch.zeros(4096))
    assert torch.equal(residual.cpu(), torch.zeros(4096))


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_tensors_are_sent_dense(dtype) -> None:
    x = torch.randn(100).to(dtype)
    residual = 0.01 * torch.randn(100)
    compressor = GradientCompressor(min_numel=4096)
    message = compressor.compress(x, residual_copy := residual.clone())
    e = x.float() + residual
    assert message.dense is not None and message.nbytes == 32 + 100 * x.element_size()
    decoded = compressor.decompress(message)
    assert decoded.dtype == dtype and torch.equal(decoded, e.to(dtype))
    assert torch.equal(decoded.float() + residual_copy, e)
    parsed = CompressedTensor.from_bytes(message.to_bytes())
    assert torch.equal(compressor.decompress(parsed), decoded)


def test_empty_tensor() -> None:
    compressor = GradientCompressor()
    message = compressor.compress(torch.empty(0))
    assert message.nbytes == 32 and message.to_bytes().numel() == 32
    assert compressor.decompress(CompressedTensor.from_bytes(message.to_bytes())).numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_never_reaches_the_residual(backend, bad) -> None:
    device = BACKEND_DEVICE[backend]
    x = torch.randn(8192)
    x[777] = bad
    x = x.to(device)
    residual = torch.randn(8192, device=device)
    before = residual.clone()
    with pytest.raises(NonFiniteError, match=r"1 of 8192 entries .* NaN or Inf"):
        GradientCompressor(backend=backend).compress(x, residual)
    assert torch.equal(residual, before)
    skipping = GradientCompressor(backend=backend, nonfinite="skip")
    message = skipping.compress(x, residual)
    assert message.count == 0 and skipping.skipped_steps == 1
    assert torch.equal(skipping.decompress(message).cpu(), torch.zeros(8192))
    assert torch.equal(residual, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulating_decode_sums_messages(backend) -> None:
    device = BACKEND_DEVICE[backend]
    compressor = GradientCompressor(density=0.3, backend=backend)
    a, b = torch.randn(10_000, device=device), torch.randn(10_000, device=device)
    out = torch.zeros(10_000, device=device)
    compressor.decompress(compressor.compress(a), out=out, accumulate=True)
    compressor.decompress(compressor.compress(b), out=out, accumulate=True)
    expected = compressor.decompress(compressor.compress(a)) + compressor.decompress(
        compressor.compress(b)
    )
    assert torch.equal(out, expected)


def test_error_feedback_state_round_trip() -> None:
    feedback = ErrorFeedback(GradientCompressor(density=0.1), residual_dtype=torch.bfloat16)
    feedback.step(torch.randn(10_000))
    restored = ErrorFeedback(GradientCompressor(density=0.1), residual_dtype=torch.bfloat16)
    restored.load_state_dict(feedback.state_dict())
    grad = torch.randn(10_000)
    assert torch.equal(restored.step(grad).values, feedback.step(grad).values)
    assert torch.equal(restored.residual, feedback.residual)
    with pytest.raises(ValueError, match="holds 10000 entries, got a gradient with 5"):
        feedback.step(torch.randn(5))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"density": 0.0}, r"density must be in \(0, 1\], got 0.0"),
        ({"density": 1.5}, r"density must be in \(0, 1\], got 1.5"),
        ({"bits": 4}, "bits=4 is not supported"),
        ({"block_size": 100}, r"block_size must be a power of two in \[8, 65536\], got 100"),
        ({"block_size": 4}, "block_size must be a power of two"),
        ({"block_size": 0}, "block_size must be a power of two"),
        ({"value_format": "int4"}, "value_format must be one of"),
        ({"selection": "random"}, "selection must be 'exact' or 'sampled'"),
        ({"tolerance": 1.0}, r"tolerance must be in \[0, 1\)"),
        ({"nonfinite": "ignore"}, "nonfinite must be 'raise' or 'skip'"),
        ({"backend": "triton"}, "backend must be"),
    ],
)
def test_bad_arguments(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        GradientCompressor(**kwargs)


def test_failed_build_falls_back_to_the_reference_with_one_warning(tmp_path, monkeypatch) -> None:
    broken = tmp_path / "compression.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv("LIGHTNING_3D_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ops, "_sources", lambda with_cuda: [str(broken)])
    ops.load.cache_clear()
    ops._loaded.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="building the lightning-3d kernels failed"):
            assert ops.backend("cpu") == "reference"
        message = GradientCompressor().compress(torch.randn(5000))  # still works, no new warning
        assert message.count == math.ceil(0.15 * 5000)
    finally:
        ops.load.cache_clear()
        ops._loaded.cache_clear()
    monkeypatch.undo()
    assert ops.backend("cpu") == "cpp"


# --------------------------------------------------------------------------------------------
# Fixed-size slots: what the collectives send (encode_into / decode_from)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("selection", ["exact", "sampled"])
@pytest.mark.parametrize("value_format", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_round_trip_equals_the_message_api(backend, selection, value_format, dtype) -> None:
    device = BACKEND_DEVICE[backend]
    numel = 70_001  # a partial last block and bitmap byte
    generator = torch.Generator().manual_seed(5)
    x = (torch.randn(numel, generator=generator) ** 3).to(dtype).to(device)
    residual = (0.1 * torch.randn(numel, generator=generator)).to(device)
    base = torch.randn(numel, generator=generator).to(device)
    compressor = GradientCompressor(
        backend=backend, selection=selection, value_format=value_format, block_size=128
    )
    message_residual, slot_residual = residual.clone(), residual.clone()
    message = compressor.compress(x, message_residual)
    layout = compressor.slot_layout(numel, dtype)
    slot = torch.full((layout.nbytes,), 0xAB, dtype=torch.uint8, device=device)  # stale bytes
    compressor.encode_into(x, slot_residual, slot)
    assert torch.equal(slot_residual.view(torch.int32), message_residual.view(torch.int32))
    nonfinite, scales, bitmap, values = layout.views(slot)
    assert int(nonfinite) == 0
    assert torch.equal(scales.view(torch.int32), message.scales.view(torch.int32))
    assert torch.equal(bitmap, message.bitmap)
    assert torch.equal(values[: message.count], message.values)
    expected = compressor.decompress(message, base.clone(), accumulate=True)
    decoded = base.clone()
    compressor.decode_from(slot, decoded, dtype, accumulate=True)
    assert torch.equal(decoded.view(torch.int32), expected.view(torch.int32))
    assert layout.nbytes % 16 == 0 and layout.nbytes >= message.nbytes - 16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize("numel", [100, 10_000])  # a dense and a sparse slot
def test_nonfinite_slot_is_flagged_and_decoded_by_policy(backend, policy, numel) -> None:
    device = BACKEND_DEVICE[backend]
    compressor = GradientCompressor(backend=backend, nonfinite=policy, min_numel=1000)
    x = torch.randn(numel, device=device)
    x[[3, 7]] = torch.tensor([float("inf"), float("nan")], device=device)
    residual = torch.ones(numel, device=device)
    nbytes = compressor.slot_layout(numel, x.dtype).nbytes
    slot = torch.full((nbytes,), 0xAB, dtype=torch.uint8, device=device)  # stale bytes
    compressor.encode_into(x, residual, slot)  # never raises: a collective must not leave early
    assert int(slot[:8].view(torch.int64)) == 2
    assert torch.equal(residual, torch.ones(numel, device=device))  # untouched
    out = torch.full((numel,), 2.0, device=device)
    compressor.decode_from(slot, out, accumulate=True)
    if policy == "raise":
        assert out.isnan().all()  # as an uncompressed sum with a NaN would be
    else:
        assert torch.equal(out, torch.full((numel,), 2.0, device=device))  # left out


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_slot_carries_the_rounding_in_the_residual(dtype) -> None:
    compressor = GradientCompressor()  # 1000 entries < min_numel: a dense slot
    x = torch.randn(1000).to(dtype)
    residual = 0.01 * torch.randn(1000)
    e = x.float() + residual
    layout = compressor.slot_layout(1000, dtype)
    assert layout.dense and layout.nbytes == 16 + math.ceil(1000 * x.element_size() / 16) * 16
    slot = torch.zeros(layout.nbytes, dtype=torch.uint8)
    compressor.encode_into(x, residual, slot)
    out = torch.zeros(1000)
    compressor.decode_from(slot, out, dtype)
    assert torch.equal(out, e.to(dtype).float())  # sent in the input's dtype
    assert torch.equal(out + residual, e)  # what was sent plus what is kept: nothing lost
    if dtype == torch.float32:
        assert not residual.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_damaged_slot_never_reads_past_its_values(backend) -> None:
    device = BACKEND_DEVICE[backend]
    compressor = GradientCompressor(backend=backend)
    layout = compressor.slot_layout(5000, torch.float32)
    slot = torch.zeros(layout.nbytes, dtype=torch.uint8, device=device)
    compressor.encode_into(torch.randn(5000, device=device), None, slot)
    slot[layout.bitmap_offset : layout.values_offset] = 0xFF  # marks 5000 > 750 values
    out = torch.zeros(5000, device=device)
    if backend == "reference":
        with pytest.raises(ValueError, match="bitmap marks 5000 entries but the message holds"):
            compressor.decode_from(slot, out)
    else:  # the kernels check as they go, never waiting for the host: the excess becomes NaN
        compressor.decode_from(slot, out)
        assert int(out.isnan().sum()) == 5000 - layout.capacity
        assert not out[: layout.capacity].isnan().any()


def test_slot_layout_of_a_slot_too_small_is_refused() -> None:
    compressor = GradientCompressor()
    layout = compressor.slot_layout(5000, torch.float32)
    with pytest.raises(ValueError, match=f"at least {layout.nbytes} bytes"):
        compressor.encode_into(
            torch.randn(5000), None, torch.zeros(layout.nbytes - 16, dtype=torch.uint8)
        )


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compressed_reduce_scatter_never_syncs_with_the_host(dtype) -> None:
    """Everything a rank does in a compressed reduce-scatter but the exchange itself (encode every
    destination's chunk, add its own, decode every source), on 3 simulated ranks, passes under
    ``set_sync_debug_mode("error")``; the result equals the message API's."""
    from lightning_3d.collectives import CompressedCommState, encode_slots, own_chunk

    world, numel = 3, 1 << 18
    chunks = [torch.randn(world, numel, device="cuda").to(dtype) for _ in range(world)]
    states = [CompressedCommState(GradientCompressor()) for _ in range(world)]
    for state in states:  # residuals and kernels exist before the checked step, as after step 1
        state.step = 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sends = [encode_slots(chunks[p], p, states[p], "unit", False) for p in range(world)]
        totals = []
        for q in range(world):
            total = own_chunk(chunks[q][q], states[q])
            for p in range(world):
                if p != q:
                    states[q].compressor.decode_from(sends[p][q], total, dtype, accumulate=True)
            totals.append(total)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for q in range(world):  # the same sums through compress/decompress (which may sync)
        expected = chunks[q][q].float()
        for p in range(world):
            if p != q:
                reference = GradientCompressor()
                residual = torch.zeros(numel, device="cuda")
                message = reference.compress(chunks[p][q], residual)
                expected = reference.decompress(message, expected, accumulate=True)
        assert torch.equal(totals[q].view(torch.int32), expected.view(torch.int32))
    assert states[0].take_stats().nonfinite == 0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("value_format", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_signed_zeros_and_the_largest_ratio_agree_bit_for_bit(
    backend, value_format, with_residual
) -> None:
    """-0.0 entries (kept and not), all-zero blocks and entries at their block's maximum give the
    same bits in the kernels as in the reference: scales, codes, decoded values and residual."""
    device = BACKEND_DEVICE[backend]
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    x[300:700:2] = -0.0  # kept (density 0.95 keeps 252 zeros, lowest index first), scale > 0
    x[-256:] = -0.0  # a whole block of negative zeros, 52 of them kept, scale 0
    x[1000] = 3.0e38  # a block maximum near the top of fp32
    x[1001] = -3.0e38
    results = []
    for name in ("reference", backend):
        compressor = GradientCompressor(
            backend=name, density=0.95, value_format=value_format, min_numel=0
        )
        on = "cpu" if name == "reference" else device
        residual = torch.zeros(4096, device=on) if with_residual else None
        message = compressor.compress(x.to(on), residual)
        decoded = compressor.decompress(message)
        results.append((message, decoded, residual))
    (ref, ref_out, ref_r), (ker, ker_out, ker_r) = results
    assert torch.equal(ker.scales.cpu().view(torch.int32), ref.scales.view(torch.int32))
    assert torch.equal(ker.values.cpu(), ref.values)
    assert torch.equal(ker_out.cpu().view(torch.int32), ref_out.view(torch.int32))
    if with_residual:
        assert torch.equal(ker_r.cpu().view(torch.int32), ref_r.view(torch.int32))
    assert not ref_out.isnan().any()


def test_gpu_check_script_runs_its_steps_on_the_cpu(tmp_path) -> None:
    """benchmarks/gpu_check.py, prepared on the CPU: every step but the tests, its JSON complete."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    out = tmp_path / "check.json"
    command = [sys.executable, str(script), "--device", "cpu", "--sizes", "1", "--repeats", "1"]
    completed = subprocess.run(
        [*command, "--skip-tests", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["build"]["backends"] == {"cpu": "cpp"}
    syncs = results["syncs"]
    assert {"exact/encode_into", "exact/decode_from", "reduce_scatter_step"} <= set(syncs)
    assert all(
        entry["syncs"] == 0 and entry["sync_free"] is None
        for entry in syncs.values()
        if isinstance(entry, dict)
    )
    (row,) = results["codec"]
    assert row["mi_entries"] == 1
    for name in ("clone", "topk", "exact_compress", "exact_encode_into", "sampled_decompress"):
        assert row[f"{name}_gbps"] > 0
    assert row["exact_compress_over_clone"] == pytest.approx(
        row["exact_compress_gbps"] / row["clone_gbps"], rel=0.02, abs=1e-3
    )
