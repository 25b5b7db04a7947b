"""Shared fixtures: the real packaged model and data, loaded once per test session."""

from __future__ import annotations

import os

import pytest

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


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test draws the same random numbers on every run: a failure always reproduces."""
    import torch

    torch.manual_seed(1234)
