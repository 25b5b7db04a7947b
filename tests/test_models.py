"""Model resolution and the one-time GGUF -> safetensors conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_3d.assets import SMOLLM2_GGUF, asset_path
from lightning_3d.models import convert_gguf, resolve_causal_lm, resolve_model_source


@pytest.mark.parametrize("name", ["org/model", "bert-base-uncased"])
def test_hub_ids_pass_through(name) -> None:
    assert resolve_model_source(name) == name


def test_existing_local_folder_resolves(tmp_path) -> None:
    assert resolve_model_source(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("path", ["/abs/missing", "../rel/missing", "a/b/c", "weights.gguf"])
def test_paths_that_do_not_exist_raise(path) -> None:
    with pytest.raises(FileNotFoundError, match=f"model path '{path}' does not exist"):
        resolve_model_source(path)


def test_default_causal_lm_is_converted_once_and_reused() -> None:
    folder = Path(resolve_causal_lm(None))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_causal_lm(None) == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == written  # not converted again


@pytest.mark.slow
def test_converted_folder_matches_direct_gguf_load(tmp_path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LIGHTNING_3D_CACHE", str(tmp_path))
    gguf = asset_path(SMOLLM2_GGUF)
    folder = convert_gguf(gguf)
    assert folder.parent == tmp_path / "models"
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, direct.config.vocab_size, (2, 16), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens).logits, direct(tokens).logits, rtol=0, atol=0)
