"""Alpha-beta projection of FSDP2 step time at scale: dense, compressed gradients, both ways.

Model (per GPU, per optimizer step, ``W`` data-parallel GPUs, ``P`` parameters, ``L`` FSDP units):

* ring all-gather or reduce-scatter of ``S`` bytes over links of ``R`` bytes/s:
  ``(W - 1) * alpha + (W - 1) / W * S / (eta * R)``
* compressed reduce-scatter (all-to-all of slots):
  ``(W - 1) * alpha + (W - 1) / W * S / (rho * eta * R) + t_codec`` with
  ``t_codec = 4P / encode_throughput + 4P / decode_throughput`` (encode what is sent, decode
  what arrives; throughputs in fp32 input bytes per second)
* int8 parameter all-gather (``all_gather="int8"``): ``P * (1 + 4 / block)`` bytes instead of
  ``2P`` (bf16), plus de-quantizing the gathered layer, taken to cost a copy of it in fp32
  (``4P / copy_throughput``) per gather
* 4-bit difference all-gather (``all_gather="int4_delta"``): ``P * (1 / 2 + 4 / block)`` bytes,
  plus decoding and adding to the kept copy, taken to cost two copies (``8P / copy_throughput``)
  per gather
* FSDP2 with ``reshard_after_forward``: two all-gathers of bf16 parameters (``2P`` bytes each:
  forward and backward) and one reduce-scatter of fp32 gradients (``4P`` bytes), each in ``L``
  pieces (one per unit, so ``L`` latencies each)
* compute: ``6 * P * T / (peak * mfu)`` for ``T`` tokens per GPU per step
* step time without overlap: compute + communication; with full overlap: max of the two.

``eta`` (achieved share of the link rate) is calibrated from the network benchmark's dense FSDP2
step times at two link rates (``t = t0 + bytes / (eta * R)`` solved for ``t0`` and ``eta``) when
``--calibration`` points to its JSON; ``rho`` is the measured wire ratio; the codec and copy
throughputs are the GPU's measured ones when ``--codec`` points to ``gpu_check.py``'s JSON (the
smallest size measured, 16M entries: smaller chunks, as at many GPUs, are slower, so this is
optimistic there). Everything else is an assumption printed with the table.

Usage::

    python benchmarks/cost_model.py --calibration network.json --codec gpu_check_h200.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

RATES = {"100mbit": 100e6 / 8, "1gbit": 1e9 / 8}  # bytes per second


@dataclass
class Assumptions:
    """What the projection takes as given (defaults: an H100 cluster, bf16 training)."""

    alpha_s: float = 10e-6  # per message on the inter-node fabric (NCCL over InfiniBand/RoCE)
    eta: float = 0.8  # achieved share of the link rate; replaced by the calibrated value
    rho: float = 13.76  # wire ratio at density 0.15, int8, block 256 (measured)
    encode_bytes_per_s: float = 1.0e12  # fp32 input per second through the encode on a GPU
    decode_bytes_per_s: float = 1.0e12  # fp32 output per second through the decode
    copy_bytes_per_s: float = 2.0e12  # fp32 per second through a plain copy
    codec_measured: str = ""  # where the three figures above come from, when measured
    gather_block: int = 256
    peak_flops: float = 989e12  # H100 SXM bf16 dense
    mfu: float = 0.4
    tokens_per_gpu: int = 16 * 2048
    layers_1b: int = 24
    layers_7b: int = 32


def ring(nbytes: float, world: int, rate: float, a: Assumptions, pieces: int) -> float:
    """Ring all-gather or reduce-scatter of ``nbytes`` in ``pieces`` collectives."""
    return pieces * (world - 1) * a.alpha_s + (world - 1) / world * nbytes / (a.eta * rate)


def step_times(params: float, layers: int, world: int, rate: float, a: Assumptions) -> dict:
    """Seconds per step: compute, and compute plus communication for dense FSDP2, compressed
    gradients (``grads``) and compressed gradients with int8 parameter gathers (``both``) or
    4-bit difference gathers (``both4``), each without overlap and (``*_overlap``) with full
    overlap."""
    compute = 6 * params * a.tokens_per_gpu / (a.peak_flops * a.mfu)
    gathers = 2 * ring(2 * params, world, rate, a, layers)
    int8_bytes = params * (1 + 4 / a.gather_block)
    int8_gathers = 2 * (ring(int8_bytes, world, rate, a, layers) + 4 * params / a.copy_bytes_per_s)
    int4_bytes = params * (0.5 + 4 / a.gather_block)
    int4_gathers = 2 * (ring(int4_bytes, world, rate, a, layers) + 8 * params / a.copy_bytes_per_s)
    dense_rs = ring(4 * params, world, rate, a, layers)
    compressed_rs = (
        layers * (world - 1) * a.alpha_s
        + (world - 1) / world * 4 * params / (a.rho * a.eta * rate)
        + 4 * params / a.encode_bytes_per_s
        + 4 * params / a.decode_bytes_per_s
    )
    comm = {
        "dense": gathers + dense_rs,
        "grads": gathers + compressed_rs,
        "both": int8_gathers + compressed_rs,
        "both4": int4_gathers + compressed_rs,
    }
    times = {"compute": compute}
    for name, seconds in comm.items():
        times[name] = compute + seconds
        times[f"{name}_overlap"] = max(compute, seconds)
    return times


def measured_codec(path: Path, a: Assumptions) -> None:
    """Set the codec and copy throughputs from ``gpu_check.py``'s JSON (its smallest size)."""
    report = json.loads(path.read_text())
    row = min(report["codec"], key=lambda r: r["mi_entries"])
    a.encode_bytes_per_s = row["exact_encode_into_gbps"] * 1e9
    a.decode_bytes_per_s = row["exact_decompress_gbps"] * 1e9
    a.copy_bytes_per_s = row["clone_gbps"] * 1e9
    device = report["environment"].get("gpu", "a GPU")
    a.codec_measured = f"measured on {device} at {row['mi_entries']}M entries"


def calibrate(path: Path) -> tuple[float, float, str]:
    """``eta`` and the fixed step time from dense FSDP2 at two rates of the network benchmark."""
    table = json.loads(path.read_text())
    points = []
    for rate_name, rows in table.items():
        row = next(r for r in rows if r["strategy"] == "fsdp2")
        # per rank per step on 2 ranks: 2 all-gathers + 1 reduce-scatter of fp32, half of each
        nbytes = 3 * 0.5 * 4 * row["params"]
        points.append((RATES[rate_name], row["median_step_s"], nbytes))
    (r1, t1, nbytes), (r2, t2, _) = points[:2]
    eta = nbytes * (1 / r1 - 1 / r2) / (t1 - t2)
    fixed = t1 - nbytes / (eta * r1)
    note = (
        f"eta = {eta:.2f} from dense FSDP2 on 2 ranks at {8 * r1 / 1e6:.0f} and {8 * r2 / 1e6:.0f} "
        f"Mbit/s ({t1:.2f} s and {t2:.2f} s per step, {nbytes / 1e6:.0f} MB per rank per step; "
        f"fixed part {fixed:.2f} s)"
    )
    # check the model on the run it did not see: compressed FSDP2 (fp32 gathers, 1/rho of the
    # reduce-scatter; the CPU codec time is left out)
    per_entry = {  # bytes per parameter each rank sends per step on 2 ranks: half of each
        "fsdp2_compressed": 0.5 * (2 * 4 + 4 / Assumptions.rho),
        "fsdp2_compressed_int8_gather": 0.5 * (2 * (1 + 4 / 256) + 4 / Assumptions.rho),
        "fsdp2_compressed_bf16_gather": 0.5 * (2 * 2 + 4 / Assumptions.rho),
        "fsdp2_compressed_int4_delta_gather": 0.5 * (2 * (0.5 + 4 / 256) + 4 / Assumptions.rho),
        "fsdp2_no_reshard": 0.5 * (4 + 4),
    }
    for rate_name, rows in table.items():
        for row in rows:
            if row["strategy"] not in per_entry:
                continue
            sent = per_entry[row["strategy"]] * row["params"]
            predicted = fixed + sent / (eta * RATES[rate_name])
            note += (
                f"\ncheck, {row['strategy']} at {rate_name}: model {predicted:.2f} s per step, "
                f"measured {row['median_step_s']:.2f} s"
            )
    return eta, fixed, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calibration", type=Path, help="JSON from fsdp_compression.py network")
    parser.add_argument("--codec", type=Path, help="JSON from gpu_check.py (GPU codec speed)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 32, 128, 512])
    parser.add_argument("--links-gbit", type=float, nargs="+", default=[100, 400])
    args = parser.parse_args()
    a = Assumptions()
    if args.calibration:
        a.eta, _, note = calibrate(args.calibration)
        print(note)
    if args.codec:
        measured_codec(args.codec, a)
    models = {"1B": (1e9, a.layers_1b), "7B": (7e9, a.layers_7b)}
    print(
        "| model | GPUs | link Gbit/s | compute s | dense s | grads compressed s | both ways s "
        "| both, int4 differences s | speed-up, grads | speed-up, both | speed-up, both int4 "
        "| speed-up, both, full overlap | speed-up, both int4, full overlap |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, (params, layers) in models.items():
        for link in args.links_gbit:
            for world in args.gpus:
                t = step_times(params, layers, world, link * 1e9 / 8, a)
                print(
                    f"| {model} | {world} | {link:.0f} | {t['compute']:.2f} | {t['dense']:.2f} | "
                    f"{t['grads']:.2f} | {t['both']:.2f} | {t['both4']:.2f} | "
                    f"{t['dense'] / t['grads']:.2f}x | {t['dense'] / t['both']:.2f}x | "
                    f"{t['dense'] / t['both4']:.2f}x | "
                    f"{t['dense_overlap'] / t['both_overlap']:.2f}x | "
                    f"{t['dense_overlap'] / t['both4_overlap']:.2f}x |"
                )
    codec = a.codec_measured or "assumed, not measured"
    print(
        f"\nAssumptions: alpha {a.alpha_s * 1e6:.0f} us per collective piece, eta {a.eta:.2f}, "
        f"wire ratio {a.rho}, encode {a.encode_bytes_per_s / 1e12:.2f} TB/s, decode "
        f"{a.decode_bytes_per_s / 1e12:.2f} TB/s, copy {a.copy_bytes_per_s / 1e12:.2f} TB/s of "
        f"fp32 per GPU ({codec}), {a.peak_flops / 1e12:.0f} TFLOP/s at {a.mfu:.0%} MFU, "
        f"{a.tokens_per_gpu} tokens per GPU per step, bf16 parameters gathered twice per step, "
        "(int8, or 4-bit differences, with one fp32 scale per 256 entries when both ways), "
        "fp32 gradients "
        "reduce-scattered once (reduce_dtype=float32), one FSDP unit per layer, every GPU on its "
        "own link, no host syncs in the codec."
    )


if __name__ == "__main__":
    main()
