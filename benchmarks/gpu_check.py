"""Every GPU figure and check of the project in one run: build, CUDA tests, host syncs, codec speed.

Usage (on a machine with a CUDA GPU; ``--device cpu`` runs the same steps on the CPU kernels, to
try the script without a GPU)::

    python benchmarks/gpu_check.py --out gpu_check.json
    python benchmarks/gpu_check.py --device cpu --sizes 1 --skip-tests --out /tmp/check.json

Steps, each recorded in the JSON even when an earlier one failed:

1. **build**: compile the native kernels (``lightning_3d.ops.load``) and time it.
2. **tests**: ``pytest -m cuda`` and the codec tests (which run on every device present), with
   the pass/fail/skip counts and the names of failures.
3. **syncs**: how many host synchronizations one compress, one decompress, one fixed-slot
   encode/decode (the collectives' path) and one rank's share of a 3-rank compressed
   reduce-scatter (all but the exchange) make, counted with
   ``torch.cuda.set_sync_debug_mode("warn")``, and whether each passes under ``"error"``.
4. **codec**: throughput at each size (Mi fp32 entries) of ``clone`` (copy bandwidth),
   ``torch.topk`` of ``|x|`` at the same density, and the kernels' compress + error feedback,
   fixed-slot encode and decompress, with the ratios the goals name: against ``clone`` and
   against ``topk``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lightning_3d.compression import GradientCompressor

sys.path.insert(0, str(Path(__file__).parent))
from compression import best_seconds  # the codec benchmark's timer

ROOT = Path(__file__).resolve().parent.parent
DENSITY = 0.15


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and the device's name."""
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": str(device),
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability(device))
    else:
        facts["cpu"] = platform.processor() or platform.machine()
        facts["threads"] = torch.get_num_threads()
    return facts


def build() -> dict[str, Any]:
    """Compile (or load from the cache) the native kernels and time it."""
    from lightning_3d import ops

    started = time.perf_counter()
    module = ops.load()
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "module": Path(module.__file__).name,
        "backends": {kind: ops.backend(kind) for kind in ("cpu", "cuda") if _has(kind)},
    }


def _has(kind: str) -> bool:
    return kind == "cpu" or torch.cuda.is_available()


TEST_RUNS = {
    "cuda_marked": ["-m", "cuda", "tests"],
    "codec": ["tests/test_compression.py"],
}


def run_tests(junit_dir: Path, deselect: list[str]) -> dict[str, Any]:
    """The CUDA-marked tests of the whole suite, then every codec test (they run on each device
    present): counts, failures and the output's tail for each run."""
    import xml.etree.ElementTree as ElementTree

    results: dict[str, Any] = {}
    for name, selection in TEST_RUNS.items():
        junit = junit_dir / f"{name}.junit.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
            *selection,
            *(f"--deselect={test}" for test in deselect),
        ]
        started = time.perf_counter()
        completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        result: dict[str, Any] = {
            "command": "pytest " + " ".join(selection),
            "returncode": completed.returncode,
            "seconds": round(time.perf_counter() - started, 1),
            "tail": (completed.stdout + completed.stderr)[-4000:],
        }
        if junit.exists():
            root = ElementTree.parse(junit).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            result.update(
                {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
            )
            result["failed"] = [
                f"{case.get('classname')}::{case.get('name')}"
                for case in suite.iter("testcase")
                if case.find("failure") is not None or case.find("error") is not None
            ]
        results[name] = result
    return results


@contextmanager
def counting_syncs(device: torch.device):
    """Count host synchronizations inside the block (CUDA only; ``[0]`` on the CPU).

    ``set_sync_debug_mode("warn")`` reports each one as a warning. An op called from Python
    raises it as a Python warning, which the default filter shows once per place (later reports
    would vanish): they are recorded with the filter set to ``"always"``. An op called from C++
    writes it to the process's stderr instead: the block's stderr goes to a file, counted too.
    """
    count = [0]
    if device.type != "cuda":
        yield count
        return
    marker = "called a synchronizing CUDA operation"
    previous = torch.cuda.get_sync_debug_mode()
    sys.stderr.flush()
    saved = os.dup(2)
    recorder = warnings.catch_warnings(record=True)
    with tempfile.TemporaryFile(mode="w+") as captured, recorder as seen:
        warnings.simplefilter("always")
        os.dup2(captured.fileno(), 2)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield count
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            from_python = sum(marker in str(warning.message) for warning in seen)
            count[0] = captured.read().count(marker) + from_python


def sync_free(run: Callable[[], object], device: torch.device) -> bool | None:
    """Whether ``run`` passes under ``set_sync_debug_mode("error")`` (``None`` off CUDA)."""
    if device.type != "cuda":
        return None
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
        return True
    except RuntimeError as error:
        if "synchroniz" not in str(error):
            raise
        return False
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def sync_report(device: torch.device, numel: int = 1 << 22) -> dict[str, Any]:
    """Host syncs per codec call: the message API and, when present, the fixed-slot API."""
    x = torch.randn(numel, device=device)
    report: dict[str, Any] = {"numel": numel}
    for selection in ("exact", "sampled"):
        for name, call in codec_calls(selection, x).items():
            call()  # warm-up: kernels loaded, allocator caches filled
            with counting_syncs(device) as count:
                call()
            report[f"{selection}/{name}"] = {
                "syncs": count[0],
                "sync_free": sync_free(call, device),
            }
    step = reduce_scatter_step(x.view(4, -1)[:3].contiguous())
    step()
    with counting_syncs(device) as count:
        step()
    report["reduce_scatter_step"] = {"syncs": count[0], "sync_free": sync_free(step, device)}
    return report


def reduce_scatter_step(chunks: torch.Tensor) -> Callable[[], object]:
    """What one of 3 ranks does in a compressed reduce-scatter but the exchange: encode the two
    remote chunks into slots, take its own chunk, decode two received slots into the sum."""
    from lightning_3d.collectives import CompressedCommState, encode_slots, own_chunk

    state = CompressedCommState(GradientCompressor())

    def run() -> torch.Tensor:
        send = encode_slots(chunks, 0, state, "unit", dense=False)
        total = own_chunk(chunks[0], state)
        for source in (1, 2):  # stand-ins for the slots the other ranks sent
            state.compressor.decode_from(send[source], total, chunks.dtype, accumulate=True)
        return total

    return run


def codec_calls(selection: str, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """One compress and one decompress of ``x`` (plus the fixed-slot pair for exact selection)."""
    compressor = GradientCompressor(density=DENSITY, selection=selection)
    residual = torch.zeros_like(x)
    message = compressor.compress(x, residual)
    out = torch.zeros_like(x)
    calls: dict[str, Callable[[], object]] = {
        "compress": lambda: compressor.compress(x, residual),
        "decompress": lambda: compressor.decompress(message, out, accumulate=True),
    }
    if selection == "exact":
        slot = torch.empty(
            compressor.slot_layout(x.numel(), x.dtype).nbytes, dtype=torch.uint8, device=x.device
        )
        calls["encode_into"] = lambda: compressor.encode_into(x, residual, slot)
        calls["decode_from"] = lambda: compressor.decode_from(slot, out, accumulate=True)
    return calls


def codec_figures(device: torch.device, sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    """GB/s of fp32 input (``4 n / s``) for clone, topk, compress + EF and decompress."""
    rows = []
    for size in sizes:
        row = codec_row(size, device, repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def codec_row(size: int, device: torch.device, repeats: int) -> dict[str, Any]:
    """The figures of one size (``size`` Mi fp32 entries), side by side on one tensor."""
    numel = size << 20
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(device)
    k = math.ceil(DENSITY * numel)
    gbps = {
        "clone": 4 * numel / best_seconds(x.clone, repeats, device),
        "topk": 4 * numel / best_seconds(lambda: x.abs().topk(k), repeats, device),
    }
    for selection in ("exact", "sampled"):
        calls = codec_calls(selection, x)
        gbps[f"{selection}_compress"] = 4 * numel / best_seconds(calls["compress"], repeats, device)
        gbps[f"{selection}_decompress"] = (
            4 * numel / best_seconds(calls["decompress"], repeats, device)
        )
        if "encode_into" in calls:
            gbps[f"{selection}_encode_into"] = (
                4 * numel / best_seconds(calls["encode_into"], repeats, device)
            )
    row: dict[str, Any] = {"mi_entries": size}
    row.update({f"{name}_gbps": round(value / 1e9, 2) for name, value in gbps.items()})
    for selection in ("exact", "sampled"):
        compress = gbps[f"{selection}_compress"]
        row[f"{selection}_compress_over_clone"] = round(compress / gbps["clone"], 3)
        row[f"{selection}_compress_over_topk"] = round(compress / gbps["topk"], 2)
    return row


def step(results: dict[str, Any], name: str, run: Callable[[], Any]) -> None:
    """Run one step; record its result or its error, never stop the others."""
    print(f"== {name}", flush=True)
    try:
        results[name] = run()
    except Exception as error:  # every step reports, whatever failed
        results[name] = {
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc()[-4000:],
        }
    print(json.dumps(results[name], default=str)[:3000], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256], help="Mi entries")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument(
        "--deselect", nargs="*", default=[], help="test ids to leave out (one that crashes)"
    )
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; pass --device cpu to try the script")
    results: dict[str, Any] = {}
    step(results, "environment", lambda: environment(device))
    step(results, "build", build)
    if not args.skip_tests:
        step(results, "tests", lambda: run_tests(args.out.parent, args.deselect))
    step(results, "syncs", lambda: sync_report(device))
    step(results, "codec", lambda: codec_figures(device, args.sizes, args.repeats))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
