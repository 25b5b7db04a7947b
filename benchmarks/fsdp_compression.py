"""Compressed gradient communication on 2 CPU ranks (gloo): bytes, accuracy, and step time.

Two benchmarks, each comparing strategies side by side in one run:

``accuracy``: MiniLM fine-tuned on Rotten Tomatoes for one full epoch on 2 ranks, dense FSDP2
against ``CompressedFSDPStrategy`` compressing both ways (gradients, int8 parameter
all-gathers): bytes on the wire, validation accuracy, wall time.

``network`` (needs root and iproute2): two network namespaces joined by a veth pair, both ends
rate-limited with ``tc`` (token bucket), one rank in each, gloo over that link only (addresses
10.77.0.1 and 10.77.0.2 inside namespaces this script creates and removes). Per-step time of
dense FSDP2 (also with ``reshard_after_forward=False``: one parameter all-gather less per step),
FSDP2 with compressed gradients, with compressed gradients and int8, bf16 or int4-difference
parameter all-gathers, DDP, DDP with PyTorch's PowerSGD hook, and DDP with our compressed hook,
at each rate, with the bytes each rank sends per step in both directions.

Usage::

    python benchmarks/fsdp_compression.py accuracy
    python benchmarks/fsdp_compression.py network --rates 100mbit 1gbit --steps 5

Results are printed as Markdown tables (and written as JSON next to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NAMESPACES = ("l3d-bench-a", "l3d-bench-b")
ADDRESSES = ("10.77.0.1", "10.77.0.2")
INTERFACES = ("l3dveth0", "l3dveth1")


# ------------------------------------------------------------------------------ worker side
def make_strategy(name: str) -> Any:
    """A fresh strategy for one of the compared set-ups."""
    from lightning.pytorch.strategies import DDPStrategy
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

    from lightning_3d.strategies import CompressedDDPStrategy, CompressedFSDPStrategy

    class HookedDDP(DDPStrategy):
        """Lightning registers DDP comm hooks on CUDA only; register PowerSGD on CPU too."""

        def configure_ddp(self) -> None:
            super().configure_ddp()
            if self.root_device.type != "cuda":
                self.model.register_comm_hook(self._ddp_comm_state, self._ddp_comm_hook)

    fsdp = {
        "fsdp2": {"compress": False},
        "fsdp2_no_reshard": {"compress": False, "reshard_after_forward": False},
        "fsdp2_compressed": {},
        "fsdp2_compressed_int8_gather": {"all_gather": "int8"},
        "fsdp2_compressed_bf16_gather": {"all_gather": "bf16"},
        "fsdp2_compressed_int4_delta_gather": {"all_gather": "int4_delta"},
    }
    if name in fsdp:
        return CompressedFSDPStrategy(**fsdp[name])
    if name == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    if name == "ddp_powersgd":
        state = powersgd.PowerSGDState(
            process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2
        )
        return HookedDDP(
            process_group_backend="gloo", ddp_comm_state=state, ddp_comm_hook=powersgd.powerSGD_hook
        )
    if name == "ddp_compressed":
        return CompressedDDPStrategy(process_group_backend="gloo")
    raise ValueError(f"unknown strategy {name!r}")


def run_accuracy(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import lightning.pytorch as pl

    from lightning_3d.data import RottenTomatoes
    from lightning_3d.tasks import SequenceClassificationTask

    pl.seed_everything(args.seed, verbose=False)
    task = SequenceClassificationTask()
    data = RottenTomatoes(tokenizer=task.tokenizer, batch_size=args.batch_size)
    strategy = make_strategy(name)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=1,
        limit_train_batches=args.limit_batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    started = time.perf_counter()
    trainer.fit(task, datamodule=data)
    wall = time.perf_counter() - started
    totals = getattr(strategy, "comm_totals", None)
    return {
        "strategy": name,
        "val_acc": float(trainer.callback_metrics["val/acc"]),
        "steps": trainer.global_step,
        "wall_s": wall,
        # both directions: gradients and, when compressed, parameter all-gathers
        "wire_bytes": totals.wire_bytes + totals.all_gather_wire_bytes if totals else None,
        "dense_bytes": totals.dense_bytes + totals.all_gather_dense_bytes if totals else None,
        "comm_s": totals.seconds if totals else None,
    }


def step_timer() -> Any:
    """A callback that keeps the wall time of every training step in ``.seconds`` (forward,
    backward, communication, update); Lightning is imported only in the ranks."""
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.started = 0.0
            self.seconds: list[float] = []

        def on_train_batch_start(self, *args: Any) -> None:
            self.started = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            self.seconds.append(time.perf_counter() - self.started)

    return StepTimer()


def run_network(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import lightning.pytorch as pl

    from lightning_3d.data import RottenTomatoes
    from lightning_3d.tasks import SequenceClassificationTask

    pl.seed_everything(args.seed, verbose=False)
    task = SequenceClassificationTask()
    data = RottenTomatoes(tokenizer=task.tokenizer, batch_size=args.batch_size)
    timer = step_timer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=make_strategy(name),
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    strategy = trainer.strategy
    trainer.fit(task, datamodule=data)
    timed = timer.seconds[args.warmup :]
    params = sum(p.numel() for p in task.parameters())  # a DTensor's numel is the full size
    totals = getattr(strategy, "comm_totals", None)
    steps = trainer.global_step
    return {
        "strategy": name,
        "params": params,
        "median_step_s": statistics.median(timed),
        "step_s": timed,
        # per rank and step, compressed collectives only (None for FSDP2's and DDP's own)
        "wire_bytes_per_step": (totals.wire_bytes + totals.all_gather_wire_bytes) / steps
        if totals
        else None,
        "dense_bytes_per_step": (totals.dense_bytes + totals.all_gather_dense_bytes) / steps
        if totals
        else None,
    }


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)  # two ranks share this machine's cores
    results = []
    for name in args.strategies:
        run = run_accuracy if args.mode == "accuracy" else run_network
        results.append(run(name, args))
    if int(os.environ["LOCAL_RANK"]) == 0 and os.environ.get("NODE_RANK", "0") == "0":
        Path(args.result).write_text(json.dumps(results))


# ------------------------------------------------------------------------------ launcher side
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    args: argparse.Namespace, result: Path, namespaced: bool, strategies: list[str]
) -> list[dict[str, Any]]:
    """Start both ranks (in their namespaces when ``namespaced``) on ``strategies``, one after
    the other, and wait for them."""
    port = str(free_port())
    processes = []
    for rank in range(2):
        env = {
            **os.environ,
            "LOCAL_RANK": str(rank),
            "NODE_RANK": "0",
            "MASTER_ADDR": ADDRESSES[0] if namespaced else "127.0.0.1",
            "MASTER_PORT": port,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        }
        command = [
            sys.executable,
            __file__,
            *sys.argv[1:],
            "--strategies",
            *strategies,
            "--result",
            str(result),
        ]
        if namespaced:
            env["GLOO_SOCKET_IFNAME"] = INTERFACES[rank]
            command = ["ip", "netns", "exec", NAMESPACES[rank], *command]
        processes.append(subprocess.Popen(command, env=env))
    codes = [process.wait() for process in processes]
    if any(codes):
        raise RuntimeError(f"a rank failed (exit codes {codes})")
    return json.loads(result.read_text())


def sh(*command: str) -> None:
    subprocess.run(command, check=True)


def create_link(rate: str) -> None:
    """Two namespaces, a veth pair between them, both ends shaped to ``rate``."""
    remove_link()
    for namespace in NAMESPACES:
        sh("ip", "netns", "add", namespace)
        sh("ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", INTERFACES[0], "type", "veth", "peer", "name", INTERFACES[1])
    for namespace, interface, address in zip(NAMESPACES, INTERFACES, ADDRESSES, strict=True):
        sh("ip", "link", "set", interface, "netns", namespace)
        inside = ("ip", "netns", "exec", namespace)
        sh(*inside, "ip", "addr", "add", f"{address}/24", "dev", interface)
        sh(*inside, "ip", "link", "set", interface, "up")
        # token bucket: `rate` sustained, 1 ms worth of burst at 1 Gbit/s, 50 ms queue
        sh(*inside, "tc", "qdisc", "add", "dev", interface, "root", "tbf", "rate", rate,
           "burst", "128kb", "latency", "50ms")  # fmt: skip


def remove_link() -> None:
    for namespace in NAMESPACES:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def print_accuracy(results: list[dict[str, Any]]) -> None:
    dense = results[0]
    print("| strategy | steps | val acc | wall s | wire MB | dense MB | ratio | comm s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        wire, full = row["wire_bytes"], row["dense_bytes"]
        ratio = f"{full / wire:.2f}x" if wire else "1x (FSDP2's own)"
        wire_mb = f"{wire / 1e6:.0f}" if wire else "-"
        full_mb = f"{full / 1e6:.0f}" if full else "-"
        comm = f"{row['comm_s']:.1f}" if wire else "-"
        print(
            f"| {row['strategy']} | {row['steps']} | {100 * row['val_acc']:.2f}% | "
            f"{row['wall_s']:.0f} | {wire_mb} | {full_mb} | {ratio} | {comm} |"
        )
    for row in results[1:]:
        delta = 100 * (row["val_acc"] - dense["val_acc"])
        print(f"{row['strategy']}: val acc {delta:+.2f} points against {dense['strategy']}")


def print_network(table: dict[str, list[dict[str, Any]]]) -> None:
    """Median s/step per strategy and rate, and each one's speed-up over dense FSDP2."""
    names = [row["strategy"] for row in next(iter(table.values()))]
    print("| strategy | " + " | ".join(f"{rate} s/step | vs fsdp2" for rate in table) + " |")
    print("|---|" + "---|---|" * len(table))
    steps = {
        rate: {row["strategy"]: row["median_step_s"] for row in rows if "error" not in row}
        for rate, rows in table.items()
    }
    for name in names:
        cells = []
        for rate in table:
            seconds, dense = steps[rate].get(name), steps[rate].get("fsdp2", float("nan"))
            cells.append(
                "failed | -" if seconds is None else f"{seconds:.2f} | {dense / seconds:.2f}x"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nbytes per rank and step through the compressed collectives (both directions):")
    for row in next(iter(table.values())):
        if "error" in row:
            print(f"{row['strategy']}: {row['error']}")
        elif row.get("wire_bytes_per_step"):
            ratio = row["dense_bytes_per_step"] / row["wire_bytes_per_step"]
            print(
                f"{row['strategy']}: {row['wire_bytes_per_step'] / 1e6:.1f} MB sent for "
                f"{row['dense_bytes_per_step'] / 1e6:.1f} MB dense ({ratio:.2f}x)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["accuracy", "network"])
    parser.add_argument("--strategies", nargs="+", default=None)
    parser.add_argument("--rates", nargs="+", default=["100mbit", "1gbit"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (network)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (network)")
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--limit-batches", type=float, default=1.0, help="accuracy: epoch share")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.strategies is None:
        args.strategies = (
            ["fsdp2", "fsdp2_compressed_int8_gather"]
            if args.mode == "accuracy"
            else [
                "fsdp2",
                "fsdp2_no_reshard",
                "fsdp2_compressed",
                "fsdp2_compressed_int8_gather",
                "fsdp2_compressed_bf16_gather",
                "fsdp2_compressed_int4_delta_gather",
                "ddp",
                "ddp_powersgd",
                "ddp_compressed",
            ]
        )
    if "LOCAL_RANK" in os.environ:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "result.json"
        if args.mode == "accuracy":
            results: Any = launch(args, result, namespaced=False, strategies=args.strategies)
            print_accuracy(results)
        else:
            if os.geteuid() != 0:
                raise SystemExit("the network benchmark needs root (ip netns, tc)")
            results = {}
            try:
                for rate in args.rates:
                    create_link(rate)
                    results[rate] = []
                    # fresh processes per strategy: one that fails (or leaves state behind in
                    # the process group) cannot take the others with it
                    for name in args.strategies:
                        try:
                            results[rate] += launch(
                                args, result, namespaced=True, strategies=[name]
                            )
                        except RuntimeError as error:
                            print(f"{name} at {rate}: {error}", file=sys.stderr)
                            results[rate].append({"strategy": name, "error": str(error)})
                        if args.out:  # what is measured so far survives a later failure
                            args.out.write_text(json.dumps(results, indent=1))
            finally:
                remove_link()
            print_network(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
