"""Native kernels: compiled from ``csrc/`` on first use, cached, with a reference fallback.

The C++ (CPU) kernels always build where a C++ compiler is present; the CUDA kernels are added
when torch has CUDA and ``nvcc`` is found. The build goes through
``torch.utils.cpp_extension.load`` (ninja) into ``<cache>/extensions/<fingerprint>``, where the
fingerprint covers the sources, the compiler flags, the torch and Python versions, and for CUDA
builds ``TORCH_CUDA_ARCH_LIST`` and the GPU's compute capability, so a change to any of them
rebuilds and an unchanged build loads in well under a second.

If the build fails, :func:`backend` answers ``"reference"`` and one warning says why; compression
then runs on the pure-PyTorch reference (same results, slower). ``LIGHTNING_3D_BACKEND=reference``
forces that choice.

Build explicitly (e.g. in a Docker image) and see which backend is active::

    python -m lightning_3d.ops

Example:
    >>> backend(torch.device("cpu")) in ("cpp", "reference")
    True
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import sys
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

from lightning_3d.cache import cache_root, fingerprint

EXTENSION_NAME = "lightning_3d_ops"
_VALUE_FORMAT_CODES = {"int8": 0, "fp8_e4m3": 1}


class BuildError(RuntimeError):
    """The native kernels could not be compiled or loaded."""


def _sources(with_cuda: bool) -> list[str]:
    root = importlib.resources.files("lightning_3d.csrc")
    names = ["compression.cpp"] + (["compression_cuda.cu"] if with_cuda else [])
    return [str(root / name) for name in names]


def _headers() -> list[str]:
    """The headers the sources include (they count in the build fingerprint too)."""
    root = importlib.resources.files("lightning_3d.csrc")
    return sorted(str(entry) for entry in root.iterdir() if entry.name.endswith((".h", ".cuh")))


def _cuda_buildable() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _cuda_target(with_cuda: bool) -> list[str]:
    """What picks the GPU architectures a CUDA build targets (part of the build fingerprint).

    ``torch.utils.cpp_extension`` builds for ``TORCH_CUDA_ARCH_LIST`` when it is set, else for
    the visible GPU, so a cached build made for another GPU is never loaded.
    """
    if not with_cuda:
        return []
    target = [os.environ.get("TORCH_CUDA_ARCH_LIST", "")]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        target.append(f"sm_{major}{minor}")
    return target


@cache
def load(verbose: bool = False) -> ModuleType:
    """Compile (once, cached on disk) and import the extension.

    Raises:
        BuildError: compilation or loading failed; the message holds the compiler's reason.
    """
    from torch.utils.cpp_extension import load as load_extension

    with_cuda = _cuda_buildable()
    sources = _sources(with_cuda)
    # ATen's parallel_for is inlined from headers: without -fopenmp it silently runs serially.
    # No FMA contraction: a fused multiply-add rounds differently from the reference.
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    flags += ["-DLIGHTNING_3D_WITH_CUDA"] if with_cuda else []
    cuda_flags = ["-O3", "--expt-relaxed-constexpr", "--fmad=false", "-DLIGHTNING_3D_WITH_CUDA"]
    contents = [Path(path).read_text(encoding="utf-8") for path in sources + _headers()]
    target = _cuda_target(with_cuda)
    key = fingerprint(torch.__version__, sys.version_info[:2], flags, cuda_flags, target, contents)
    build_dir = cache_root() / "extensions" / f"{EXTENSION_NAME}-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return load_extension(
            name=f"{EXTENSION_NAME}_{key}",
            sources=sources,
            extra_cflags=flags,
            extra_cuda_cflags=cuda_flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=verbose,
        )
    except Exception as error:  # compiler missing, headers mismatched, nvcc failure, ...
        raise BuildError(f"building the lightning-3d kernels failed: {error}") from error


@cache
def _loaded() -> ModuleType | None:
    if os.environ.get("LIGHTNING_3D_BACKEND", "").lower() == "reference":
        return None
    try:
        return load()
    except BuildError as error:
        warnings.warn(
            f"{error}. Falling back to the pure-PyTorch reference implementation (same results, "
            "slower). Run `python -m lightning_3d.ops` to see the full build log.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def backend(device: torch.device | str) -> str:
    """Which implementation runs on ``device``: ``"cpp"``, ``"cuda"`` or ``"reference"``."""
    device = torch.device(device)
    module = _loaded()
    if module is None:
        return "reference"
    if device.type == "cpu":
        return "cpp"
    if device.type == "cuda" and module.has_cuda():
        return "cuda"
    return "reference"


def require(name: str, device: torch.device) -> None:
    """Raise unless backend ``name`` can run on ``device``."""
    if backend(device) != name:
        raise BuildError(
            f"backend {name!r} was requested for a tensor on {device}, but the active backend "
            f"there is {backend(device)!r}"
        )


def encode(
    grad: torch.Tensor,
    residual: torch.Tensor | None,
    density: float,
    block_size: int,
    value_format: str,
    sample_count: int,
    tolerance: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Kernel twin of :func:`lightning_3d.compression.reference_encode`."""
    module = _loaded()
    assert module is not None
    scales, bitmap, values, nonfinite = module.encode(
        grad.contiguous(),
        residual,
        density,
        block_size,
        _VALUE_FORMAT_CODES[value_format],
        sample_count,
        tolerance,
    )
    return scales, bitmap, values, int(nonfinite)


def decode_parts(
    scales: torch.Tensor,
    bitmap: torch.Tensor,
    values: torch.Tensor,
    block_size: int,
    value_format: str,
    out: torch.Tensor,
    accumulate: bool,
) -> None:
    """Kernel twin of :func:`lightning_3d.compression.reference_decode_parts` (``out`` is flat;
    ``values`` may hold unused room at its end). Entries a damaged bitmap marks past the values
    decode to NaN: the check needs no host round trip and never raises."""
    module = _loaded()
    assert module is not None
    module.decode(
        scales,
        bitmap,
        values,
        out.numel(),
        block_size,
        _VALUE_FORMAT_CODES[value_format],
        out,
        accumulate,
    )


def encode_into(
    grad: torch.Tensor,
    residual: torch.Tensor | None,
    k: int,
    block_size: int,
    value_format: str,
    scales: torch.Tensor,
    bitmap: torch.Tensor,
    values: torch.Tensor,
    nonfinite: torch.Tensor,
) -> None:
    """Exact selection of ``k`` entries encoded into caller-owned views, on CUDA, with no host
    synchronization (the non-finite count stays in ``nonfinite``, an int64 view)."""
    module = _loaded()
    assert module is not None
    module.encode_into(
        grad.contiguous(),
        residual,
        k,
        block_size,
        _VALUE_FORMAT_CODES[value_format],
        scales,
        bitmap,
        values,
        nonfinite,
    )


def main() -> None:
    """``python -m lightning_3d.ops``: build verbosely and report the active backends."""
    logging.basicConfig(level=logging.INFO)
    module = load(verbose=True)
    print(f"built: {module.__file__}")
    print(f"cpu backend: {backend('cpu')}")
    if torch.cuda.is_available():
        print(f"cuda backend: {backend('cuda')}")


if __name__ == "__main__":
    main()
