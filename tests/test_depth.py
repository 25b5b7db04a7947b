"""Depth pruning: block influence against a hand computation from the model's hidden states,
removed blocks against a model built without them (forward, generation, save and reload), and
``DepthPruner`` in a run: the least influential blocks go before the optimizer is built, the
run resumes as the uninterrupted one, a fresh model loads the checkpoint, and the runtime
export computes what the shallower model does."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_3d.callbacks import DepthPruner
from lightning_3d.checkpoints import load_run_weights
from lightning_3d.data import RottenTomatoesPrompts
from lightning_3d.depth import (
    block_influence,
    cut_like_state,
    decoder_blocks,
    depth_in_state,
    least_influential,
    remove_blocks,
)
from lightning_3d.plan import ThreeDPlan
from lightning_3d.tasks import LoRASettings, PromptClassificationTask
from lightning_3d.vocabulary import every_sample

ADAPTERS = LoRASettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def llama(layers: int = 4, vocabulary: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocabulary, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_block_influence_is_one_minus_the_cosine_of_each_blocks_input_and_output() -> None:
    model = llama().train()  # measured in eval mode, left in train mode
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones(2, 7)
    mask[1, 5:] = 0  # right padding: the causal model's real tokens do not see it
    sums, tokens = block_influence(model, [{"input_ids": ids, "attention_mask": mask}])
    assert tokens.item() == 12.0
    assert all(module.training for module in model.modules())
    model.eval()

    # by hand: a block's input is the previous block's output (the stack's hidden states)
    states: list[torch.Tensor] = []
    hooks = [
        block.register_forward_hook(
            lambda _, __, out: states.append(out[0] if isinstance(out, tuple) else out)
        )
        for block in model.model.layers
    ]
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids)
        model(input_ids=ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    inputs = [hidden, *states[:-1]]
    for index, (x, y) in enumerate(zip(inputs, states, strict=True)):
        cosine = torch.nn.functional.cosine_similarity(x, y, dim=-1)
        expected = ((1 - cosine) * mask).sum()
        assert sums[index].item() == pytest.approx(expected.item(), rel=1e-5)

    # padding tokens count nothing: other ids there leave the sums as they were
    other = ids.clone()
    other[1, 5:] = 3
    again, _ = block_influence(model, [{"input_ids": other, "attention_mask": mask}])
    torch.testing.assert_close(again, sums)


def test_least_influential_picks_the_lowest_and_the_deeper_of_a_tie() -> None:
    influence = torch.tensor([0.4, 0.1, 0.3, 0.1, 0.2])
    assert least_influential(influence, 1) == [3]
    assert least_influential(influence, 3) == [1, 3, 4]
    for count in (0, 5):
        with pytest.raises(ValueError, match=r"count must be in \[1, 4\]"):
            least_influential(influence, count)


def test_removed_blocks_compute_what_a_model_built_without_them_does(tmp_path) -> None:
    model = llama()
    reference = llama(layers=2)
    state = model.state_dict()
    kept = {0: 0, 3: 1}
    mapped = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[:2] == ["model", "layers"]:
            if int(parts[2]) not in kept:
                continue
            parts[2] = str(kept[int(parts[2])])
        mapped[".".join(parts)] = value
    reference.load_state_dict(mapped)

    assert remove_blocks(model, [2, 1]) == [1, 2]
    assert model.config.num_hidden_layers == 2 and model.config.removed_layers == [1, 2]
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
        # generation fills a key/value cache slot per remaining block
        generated = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
        expected = reference.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, expected)

    model.save_pretrained(tmp_path / "shallow")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "shallow").eval()
    assert len(loaded.model.layers) == 2 and loaded.config.removed_layers == [1, 2]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)
    # a second cut counts in the original numbering
    assert remove_blocks(loaded, [1]) == [1, 2, 3]


def test_bad_blocks_to_remove_are_refused() -> None:
    model = llama()
    for drop in ([4], [-1], [1, 1]):
        with pytest.raises(ValueError, match=r"distinct indices in \[0, 4\)"):
            remove_blocks(model, drop)
    with pytest.raises(ValueError, match="removing 4 of 4 blocks leaves none"):
        remove_blocks(model, [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"config has num_hidden_layers; got Linear"):
        remove_blocks(torch.nn.Linear(2, 2), [0])
    assert len(model.model.layers) == 4  # nothing removed by a refused call
    assert (
        depth_in_state({"a.layers.0.w": 1, "a.layers.11.w": 1, "b.layers.30.w": 1}, "a.layers")
        == 12
    )
    assert depth_in_state({"b.w": 1}, "a.layers") is None
    deeper = {f"model.layers.{i}.mlp.up_proj.weight": None for i in range(5)}
    with pytest.raises(ValueError, match="the weights hold 5 blocks but the model has 4"):
        cut_like_state(model, deeper)
    assert cut_like_state(model, {"lm_head.weight": None}) is None
    assert cut_like_state(torch.nn.Linear(2, 2), deeper) is None


@pytest.fixture
def four_block_llama(save_tiny_llama) -> Path:
    """A saved four-block Llama over SmolLM2's vocabulary with its tokenizer (heads of 16: the
    runtime's attention needs a multiple of 16)."""
    return save_tiny_llama(blocks=4, hidden=64)


class InOrder(pl.LightningDataModule):
    """The prompts' training batches in dataset order every epoch: a resumed run reads what the
    uninterrupted one did (a shuffled epoch's order comes from the global random state)."""

    def __init__(self, data: RottenTomatoesPrompts) -> None:
        super().__init__()
        self.data = data

    def train_dataloader(self) -> Any:
        return every_sample(self.data.train_dataloader())

    def test_dataloader(self) -> Any:
        return self.data.test_dataloader()


def trainer(tmp_path, epochs: int, *callbacks: pl.Callback, **options: Any) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=list(callbacks), limit_val_batches=0, default_root_dir=tmp_path, **options,
    )  # fmt: skip


def test_depth_pruner_removes_the_least_influential_blocks_before_the_optimizer(
    four_block_llama, small_prompts, tmp_path
) -> None:
    task = PromptClassificationTask(
        model_name_or_path=str(four_block_llama), lora=ADAPTERS, learning_rate=1e-2
    )
    data = small_prompts(task.tokenizer)
    # the influence the callback should read: the first 2 batches of the dataset, in order
    untouched = copy.deepcopy(task.model)
    batches = itertools.islice(every_sample(data.train_dataloader()), 2)
    sums, tokens = block_influence(untouched, batches)
    expected = least_influential(sums / tokens, 2)

    pruner = DepthPruner(blocks=2, batches=2)
    run = trainer(tmp_path, 1, pruner)
    run.fit(task, datamodule=data)
    assert pruner.removed == expected
    base = task.model.get_base_model()
    assert len(base.model.layers) == 2 and base.config.removed_layers == expected
    optimized = {id(p) for group in run.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in task.parameters() if p.requires_grad}
    assert len(optimized) == 2 * 2 * 2  # 2 blocks, q and v, A and B
    assert run.callback_metrics["depth/kept_blocks"].item() == 2
    assert run.callback_metrics["depth/removed_blocks"].item() == 2


def test_a_depth_pruned_run_resumes_as_the_uninterrupted_run_and_loads_for_testing(
    four_block_llama, small_prompts, stop_after_first_epoch, tmp_path
) -> None:
    def task() -> PromptClassificationTask:
        pl.seed_everything(0)
        return PromptClassificationTask(
            model_name_or_path=str(four_block_llama), lora=ADAPTERS, learning_rate=1e-2
        )

    whole = task()
    data = InOrder(small_prompts(whole.tokenizer))
    trainer(tmp_path, 2, DepthPruner(blocks=1, batches=2)).fit(whole, datamodule=data)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_on_train_epoch_end=True)
    stopped = trainer(
        tmp_path, 2, DepthPruner(blocks=1, batches=2), checkpoint, stop_after_first_epoch
    )
    stopped.fit(task(), datamodule=data)
    resumed, pruner = task(), DepthPruner(blocks=1, batches=2)
    trainer(tmp_path, 2, pruner).fit(resumed, datamodule=data, ckpt_path=checkpoint.best_model_path)
    trained = dict(whole.named_parameters())
    assert set(trained) == {n for n, _ in resumed.named_parameters()}
    for name, param in resumed.named_parameters():
        torch.testing.assert_close(param, trained[name], rtol=0, atol=1e-6, msg=name)
    assert pruner.removed == whole.model.get_base_model().config.removed_layers

    # a fresh, whole model is cut to the checkpoint's depth before its weights load
    fresh = task()
    tested = trainer(tmp_path, 1, DepthPruner(blocks=1))
    tested.test(fresh, datamodule=data, ckpt_path=checkpoint.best_model_path, verbose=False)
    assert len(decoder_blocks(fresh.model)) == 3
    saved = torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"]
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)
    # and outside a trainer (what lightning-3d export does)
    exported = load_run_weights(task(), checkpoint.best_model_path)
    assert len(decoder_blocks(exported.model)) == 3
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)


def test_depth_pruner_refuses_bad_arguments_before_training(
    four_block_llama, small_prompts, tmp_path
) -> None:
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=r"blocks must be an integer >= 1"):
            DepthPruner(blocks=bad)
    with pytest.raises(ValueError, match=r"batches must be an integer >= 1"):
        DepthPruner(blocks=1, batches=0)
    task = PromptClassificationTask(model_name_or_path=str(four_block_llama), lora=ADAPTERS)
    data = small_prompts(task.tokenizer)
    with pytest.raises(ValueError, match=r"blocks=4 would remove every one of the model's 4"):
        trainer(tmp_path, 1, DepthPruner(blocks=4)).fit(task, datamodule=data)
    with pytest.raises(ValueError, match="measures block influence on the data module"):
        trainer(tmp_path, 1, DepthPruner(blocks=1)).fit(task, data.train_dataloader())
    assert len(decoder_blocks(task.model)) == 4


def test_the_plan_removes_blocks_first_and_checks_its_argument() -> None:
    callbacks = ThreeDPlan(drop_blocks=3, trainable=0.5).callbacks()
    names = [type(c).__name__ for c in callbacks]
    assert names == ["PlanCoordinator", "DepthPruner", "SensitivityFreezer"]
    assert callbacks[1].blocks == 3
    assert "depth" in ThreeDPlan(drop_blocks=3).axes and "depth" not in ThreeDPlan().axes
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"drop_blocks must be an integer >= 0"):
            ThreeDPlan(drop_blocks=bad)


def test_the_runtime_export_of_a_depth_pruned_model_scores_as_pytorch(
    four_block_llama, small_prompts, tmp_path
) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    from lightning_3d.generation import answer_log_probs_generated, export_generator

    task = PromptClassificationTask(
        model_name_or_path=str(four_block_llama), lora=ADAPTERS, learning_rate=1e-2
    )
    data = small_prompts(task.tokenizer)
    trainer(tmp_path, 1, DepthPruner(blocks=2, batches=2)).fit(task, datamodule=data)
    built = export_generator(task.model, task.tokenizer, tmp_path / "fp32", weight_bits=None)
    config = json.loads((Path(built.path) / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 2
    test = data.splits["test"]
    runtime = og.Model(str(built.path))
    params = og.GeneratorParams(runtime)
    params.set_search_options(max_length=64)
    generator = og.Generator(runtime, params)
    model = task.model.eval()
    for prompt in test.prompts[:3]:
        prompt = [int(t) for t in prompt]
        scores = answer_log_probs_generated(generator, prompt, test.answers)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
        assert scores == pytest.approx([float(logits[a[0]]) for a in test.answers], abs=2e-4)


@pytest.mark.parametrize("ranks", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_every_ddp_rank_removes_the_blocks_of_the_ranks_summed_influence(
    launch_two_ranks, tmp_path, ranks
) -> None:
    results = launch_two_ranks("depth", tmp_path, 600, ranks)
    for result in results:
        assert result.returncode == 0, result.stdout[-3000:]
    runs = [json.loads((tmp_path / f"depth.rank{r}.json").read_text()) for r in range(ranks)]
    assert len({tuple(run["sums"]) for run in runs}) == ranks  # each rank read other reviews
    sums = torch.tensor([run["sums"] for run in runs], dtype=torch.float64).sum(0)
    influence = sums / sum(run["tokens"] for run in runs)
    expected = least_influential(influence, 1)
    for run in runs:
        assert run["removed"] == expected and run["blocks"] == 1 and run["rank_spread"] == 0.0
