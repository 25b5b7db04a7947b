"""Shared fixtures: the real packaged model and data, loaded once per test session, and a
launcher for the 2-process jobs in ``tests/jobs``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

DISTRIBUTED_JOB = Path(__file__).parent / "jobs" / "distributed_job.py"
# the jobs' model (``job_model.job_minilm``), for tests that load what a job saved
sys.path.insert(0, str(DISTRIBUTED_JOB.parent))

# Tests never reach the Hugging Face Hub: every default comes from installed packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def classifier_task():
    from lightning_3d.tasks import SequenceClassificationTask

    return SequenceClassificationTask()


@pytest.fixture(scope="session")
def minilm_tokenizer(classifier_task):
    return classifier_task.tokenizer


@pytest.fixture(scope="session")
def rotten_tomatoes(minilm_tokenizer):
    from lightning_3d.data import RottenTomatoes

    data = RottenTomatoes(tokenizer=minilm_tokenizer, batch_size=8)
    data.setup("fit")
    return data


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from lightning_3d.models import load_tokenizer, resolve_causal_lm

    return load_tokenizer(resolve_causal_lm(None))


@pytest.fixture
def save_tiny_llama(smollm2_tokenizer, tmp_path):
    """``save(blocks=2, hidden=32)``: a saved Llama of ``blocks`` blocks over SmolLM2's
    vocabulary (tied table, 4 heads, random weights of seed 0) with SmolLM2's tokenizer beside
    it: a ``model_name_or_path`` that loads in a second."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def save(blocks: int = 2, hidden: int = 32) -> Path:
        config = LlamaConfig(
            vocab_size=len(smollm2_tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=blocks, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True, bos_token_id=smollm2_tokenizer.bos_token_id,
            eos_token_id=smollm2_tokenizer.eos_token_id,
        )  # fmt: skip
        folder = tmp_path / f"tiny-llama-{blocks}x{hidden}"
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        smollm2_tokenizer.save_pretrained(folder)
        return folder

    return save


@pytest.fixture
def tiny_llama_folder(save_tiny_llama) -> Path:
    """A saved two-block Llama (:func:`save_tiny_llama`)."""
    return save_tiny_llama()


@pytest.fixture
def small_prompts():
    """``cut(tokenizer, train=16, batch_size=4)``: the Rotten Tomatoes prompts (40 tokens), cut
    to ``train`` training and 8 val/test samples."""
    from lightning_3d.data import PromptDataset, RottenTomatoesPrompts

    def cut(tokenizer, train: int = 16, batch_size: int = 4) -> RottenTomatoesPrompts:
        data = RottenTomatoesPrompts(tokenizer=tokenizer, max_length=40, batch_size=batch_size)
        data.setup("fit")
        for split, count in (("train", train), ("val", 8), ("test", 8)):
            full = data.splits[split]
            data.splits[split] = PromptDataset(
                full.prompts[:count], full.answers, full.classes[:count]
            )
        return data

    return cut


@pytest.fixture
def stop_after_first_epoch():
    """A callback that stops the run at the end of its first epoch (after an epoch-end
    checkpoint): an interruption to resume from."""
    from lightning.pytorch import Callback

    class StopAfterOneEpoch(Callback):
        def on_train_epoch_end(self, trainer, module) -> None:
            trainer.should_stop = True

    return StopAfterOneEpoch()


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test draws the same random numbers on every run: a failure always reproduces."""
    import torch

    torch.manual_seed(1234)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_once(
    scenarios: str, out: Path, timeout: float, ranks: int
) -> list[subprocess.CompletedProcess[str]]:
    port = str(_free_port())
    processes = []
    for rank in range(ranks):
        env = {
            **os.environ,
            "JOB_RANKS": str(ranks),
            "LOCAL_RANK": str(rank),
            "NODE_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONFAULTHANDLER": "1",  # a native crash prints every thread's Python stack
        }
        command = [sys.executable, str(DISTRIBUTED_JOB), scenarios, str(out)]
        processes.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    results = []
    for process in processes:
        output, _ = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, output, ""))
    return results


def _launch(
    scenarios: str, out: Path, timeout: float, ranks: int = 2, retry_native_crash: bool = True
) -> list[subprocess.CompletedProcess[str]]:
    """Run ``tests/jobs/distributed_job.py SCENARIOS OUT`` on ``ranks`` CPU processes the way
    Lightning documents manually launched jobs (LOCAL_RANK, MASTER_ADDR/PORT); every rank
    writes ``OUT/<scenario>.rank<r>.json``.

    A rank killed by a signal (a native abort such as glibc's ``free(): invalid pointer``, seen
    once in CI as the strategy job's DDP scenario started after its FSDP2 runs, and not in 12
    further runs of that job) is not a failed assertion: with ``retry_native_crash`` the job
    runs once more in an empty ``OUT`` (the crashed attempt kept beside it as ``OUT-crashed``)
    and a warning carries the crash's output. A second crash, or any rank exiting with an
    error, is returned as it is."""
    results = _launch_once(scenarios, out, timeout, ranks)
    crashed = [rank for rank, result in enumerate(results) if result.returncode < 0]
    if not crashed or not retry_native_crash:
        return results
    tails = "\n".join(
        f"rank {rank} (signal {-results[rank].returncode}):\n{results[rank].stdout[-3000:]}"
        for rank in crashed
    )
    warnings.warn(
        f"distributed job {scenarios!r} crashed natively; running it once more\n{tails}",
        stacklevel=2,
    )
    kept = out.with_name(out.name + "-crashed")
    shutil.rmtree(kept, ignore_errors=True)
    if out.exists():
        out.rename(kept)
    out.mkdir(parents=True)
    return _launch_once(scenarios, out, timeout, ranks)


@pytest.fixture(scope="session")
def launch_two_ranks():
    """``launch(scenarios, out, timeout, ranks=2, retry_native_crash=True)``: run
    distributed-job scenarios on CPU ranks (:func:`_launch`)."""
    return _launch
