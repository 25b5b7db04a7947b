"""The examples in the docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "assets",
    "cache",
    "cli",
    "collectives",
    "compression",
    "curriculum",
    "curriculum_state",
    "freezing",
    "data",
    "loggers",
    "models",
    "ops",
    "sampling",
    "sharding",
    "tasks",
    "sensitivity",
    "callbacks.curriculum",
    "callbacks.freezing",
    "pruning",
    "callbacks.pruning",
    "quantization",
    "callbacks.quantization",
    "plan",
    "callbacks.plan",
    "budget",
    "distillation",
    "callbacks.distillation",
    "vocabulary",
    "callbacks.vocabulary",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(f"lightning_3d.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
