"""Throughput of compression + error feedback and of decompression, side by side in one run.

Usage:
    python benchmarks/compression.py                      # 1M, 4M, 16M, 64M fp32 entries
    python benchmarks/compression.py --sizes 1 16 --device cuda

For each size, on the same tensor: ``clone`` (memory bandwidth), the compiled kernels and the
pure-PyTorch reference, each with exact and sampled selection at density 0.15, int8 values and an
fp32 residual. Throughput is GB/s of fp32 input (``4 * n / seconds``), best of ``--repeats`` runs
after one warm-up. Ratios are printed against the reference and against ``clone``; the wire ratio
is dense fp32 bytes over compressed bytes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from lightning_3d import ops
from lightning_3d.compression import ErrorFeedback, GradientCompressor


def best_seconds(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Best wall time of ``repeats`` calls after one warm-up (synchronizing on CUDA)."""

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()
    return min(timed() for _ in range(repeats))


def clone_seconds(numel: int, repeats: int, device: torch.device) -> float:
    """Best time of ``clone`` of an fp32 tensor: the memory-bandwidth yardstick."""
    source = torch.randn(numel).to(device)
    return best_seconds(source.clone, repeats, device)


def measure(numel: int, backend: str, selection: str, repeats: int, device: torch.device):
    """(compress+EF seconds, decompress seconds, wire bytes) for one configuration."""
    grad = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(device)
    compressor = GradientCompressor(backend=backend, selection=selection)
    feedback = ErrorFeedback(compressor)
    message = feedback.step(grad)
    out = torch.empty_like(grad)
    compress = best_seconds(lambda: feedback.step(grad), repeats, device)
    decompress = best_seconds(lambda: compressor.decompress(message, out=out), repeats, device)
    return compress, decompress, message.nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64], help="Mi entries")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    kernels = ops.backend(device)
    print(f"device {device}, kernels: {kernels}, torch threads: {torch.get_num_threads()}")
    header = (
        "| entries | selection | clone GB/s | kernels compress+EF GB/s | reference compress+EF GB/s"
        " | kernels / reference | kernels / clone | kernels decompress GB/s"
        " | reference decompress GB/s | wire ratio |"
    )
    print(header)
    print("|---" * 10 + "|")
    for size in args.sizes:
        numel = size << 20
        clone = clone_seconds(numel, args.repeats, device)
        for selection in ("exact", "sampled"):
            fast = measure(numel, kernels, selection, args.repeats, device)
            slow = measure(numel, "reference", selection, args.reference_repeats, device)
            gbps = [4 * numel / seconds / 1e9 for seconds in (clone, fast[0], slow[0])]
            print(
                f"| {size}M | {selection} | {gbps[0]:.2f} | {gbps[1]:.2f} | {gbps[2]:.3f} "
                f"| {slow[0] / fast[0]:.1f}x | {clone / fast[0]:.0%} "
                f"| {4 * numel / fast[1] / 1e9:.2f} | {4 * numel / slow[1] / 1e9:.2f} "
                f"| {4 * numel / fast[2]:.2f}x |"
            )


if __name__ == "__main__":
    main()
