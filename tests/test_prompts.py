"""Classification with a causal LM: prompt-and-answer sequences, answer scoring against a
one-candidate-at-a-time reference, and the task on the real SmolLM2 with LoRA."""

from __future__ import annotations

import pytest
import torch
from lightning import Trainer
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_3d.data import (
    IGNORE_INDEX,
    PaddingCollator,
    PromptDataset,
    PromptTemplate,
    RottenTomatoes,
    RottenTomatoesPrompts,
)
from lightning_3d.tasks import LoRASettings, PromptClassificationTask, answer_log_probs


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def logits_of(model: LlamaForCausalLM):
    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).logits

    return run


def one_at_a_time(model, prompt: torch.Tensor, answer: torch.Tensor) -> float:
    """The reference: one unpadded forward of prompt + answer, its answer tokens' log-probs."""
    ids = torch.cat([prompt, answer])[None]
    log_probs = model(input_ids=ids).logits[0].log_softmax(-1)
    start = len(prompt)
    return sum(log_probs[start + j - 1, int(answer[j])].item() for j in range(len(answer)))


def prompt_batch(prompts: list[torch.Tensor], answers, classes) -> dict[str, torch.Tensor]:
    data = PromptDataset(prompts, answers, classes)
    return PaddingCollator(0)([data[i] for i in range(len(data))])


PROMPTS = [torch.tensor([3, 4, 5, 6]), torch.tensor([7, 8]), torch.tensor([9, 10, 11])]


# -- data ---------------------------------------------------------------------------------------
def test_prompt_items_label_the_answer_only_and_collate_their_class() -> None:
    answers = [torch.tensor([20]), torch.tensor([21, 22])]
    batch = prompt_batch(PROMPTS, answers, [1, 0, 1])
    assert batch["input_ids"].tolist() == [
        [3, 4, 5, 6, 21, 22],
        [7, 8, 20, 0, 0, 0],
        [9, 10, 11, 21, 22, 0],
    ]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX] * 4 + [21, 22],
        [IGNORE_INDEX] * 2 + [20] + [IGNORE_INDEX] * 3,
        [IGNORE_INDEX] * 3 + [21, 22, IGNORE_INDEX],
    ]
    assert batch["attention_mask"].sum(1).tolist() == [6, 3, 5]
    assert batch["class_label"].tolist() == [1, 0, 1]
    assert batch["prompt_length"].tolist() == [4, 2, 3]
    assert batch["index"].tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PromptTemplate(answers=(" yes",)), "needs >= 2 answers"),
        (lambda: PromptTemplate(answers=(" yes", " yes")), "the answers must differ"),
        (lambda: PromptTemplate(answers=(" yes", " ")), "every answer needs visible text"),
        (
            lambda: PromptDataset(PROMPTS[:1], [torch.tensor([1]), torch.tensor([2])], [2]),
            r"labels \[2\] have no answer: the template has 2 answers",
        ),
        (lambda: PromptDataset(PROMPTS, [torch.tensor([1])] * 2, [0]), "3 prompts but 1 labels"),
        (
            lambda: RottenTomatoesPrompts(label_names=["a", "b", "c"]),
            "label_names has 3 labels but the template has 2 answers",
        ),
    ],
)
def test_bad_prompt_settings_raise_a_clear_value_error(build, message) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_a_max_length_without_room_for_the_text_is_refused(smollm2_tokenizer) -> None:
    with pytest.raises(ValueError, match="max_length=5 leaves no room for the text"):
        PromptTemplate().encode(smollm2_tokenizer, ["a review"], max_length=5)


def test_rotten_tomatoes_prompts_are_the_same_splits_as_text_sequences(
    smollm2_tokenizer, tmp_path
) -> None:
    prompts = RottenTomatoesPrompts(tokenizer=smollm2_tokenizer, max_length=48, cache_dir=tmp_path)
    prompts.setup("fit")
    plain = RottenTomatoes(tokenizer=smollm2_tokenizer, cache_dir=tmp_path)
    plain.setup("fit")
    for split in ("train", "val", "test"):
        assert prompts.texts[split] == plain.texts[split]
        assert prompts.splits[split].classes == plain.splits[split].labels
    item = prompts.splits["train"][0]
    text, label = prompts.texts["train"][0], prompts.splits["train"].classes[0]
    # the tokens read as the rendered prompt (the text cut to fit 48 tokens), then the answer
    decoded = smollm2_tokenizer.decode(item["input_ids"])
    assert decoded.startswith("Review: " + text[:20]) and len(item["input_ids"]) <= 48
    assert decoded.endswith("\nSentiment:" + PromptTemplate().answers[label])
    answer = item["labels"][item["labels"] != IGNORE_INDEX]
    assert answer.tolist() == PromptTemplate().answer_ids(smollm2_tokenizer)[label].tolist()
    assert item["prompt_length"] == len(item["input_ids"]) - len(answer)
    assert prompts.num_labels == 2


# -- answer scoring -----------------------------------------------------------------------------
@pytest.mark.parametrize("answer_lengths", [(1, 1), (1, 3), (2, 2, 1)])
def test_answer_log_probs_equal_one_candidate_at_a_time(answer_lengths) -> None:
    model = tiny_llama()
    answers = [torch.randint(12, 40, (n,)) for n in answer_lengths]
    batch = prompt_batch(PROMPTS, answers, [0, 1, 0])
    with torch.no_grad():
        scores = answer_log_probs(
            logits_of(model), batch["input_ids"], batch["prompt_length"], answers
        )
        expected = [[one_at_a_time(model, p, a) for a in answers] for p in PROMPTS]
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-4, atol=1e-5)


def test_one_token_answers_reuse_the_batch_logits_without_a_forward() -> None:
    model = tiny_llama()
    answers = [torch.tensor([20]), torch.tensor([30])]
    batch = prompt_batch(PROMPTS, answers, [1, 0, 1])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

        def no_forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            raise AssertionError("no forward should run when the logits are given")

        scores = answer_log_probs(
            no_forward, batch["input_ids"], batch["prompt_length"], answers, logits=logits
        )
        expected = [[one_at_a_time(model, p, a) for a in answers] for p in PROMPTS]
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-4, atol=1e-5)


# -- the task on the real SmolLM2 ---------------------------------------------------------------
@pytest.fixture(scope="module")
def prompt_task() -> PromptClassificationTask:
    return PromptClassificationTask(lora=LoRASettings(r=4, target_modules=["q_proj", "v_proj"]))


def test_the_task_trains_on_answer_tokens_with_lora(prompt_task, tmp_path) -> None:
    data = RottenTomatoesPrompts(
        tokenizer=prompt_task.tokenizer, max_length=40, batch_size=4, cache_dir=tmp_path
    )
    data.setup("fit")
    batch = PaddingCollator(prompt_task.tokenizer.pad_token_id)(
        [data.splits["train"][i] for i in range(4)]
    )
    out = prompt_task.training_step(batch, 0)
    with torch.no_grad():  # Hugging Face's loss with the same labels: the answer tokens only
        reference = prompt_task.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).loss
    torch.testing.assert_close(out["loss"].detach(), reference, rtol=1e-4, atol=1e-4)
    # one answer token per sample: the per-sample score is that token's loss
    assert out["per_sample_loss"].shape == (4,)
    torch.testing.assert_close(out["per_sample_loss"].mean(), out["loss"].detach())
    out["loss"].backward()
    with_grad = {n for n, p in prompt_task.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    prompt_task.zero_grad(set_to_none=True)


def test_the_task_logs_accuracy_from_answer_log_probs(prompt_task, tmp_path) -> None:
    data = RottenTomatoesPrompts(
        tokenizer=prompt_task.tokenizer, max_length=40, batch_size=4, cache_dir=tmp_path
    )
    trainer = Trainer(
        limit_test_batches=3, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    metrics = trainer.test(prompt_task, datamodule=data, verbose=False)[0]
    # the same 24 samples scored by hand: the answer with the higher log-probability
    test = data.splits["test"]
    batch = PaddingCollator(prompt_task.tokenizer.pad_token_id)([test[i] for i in range(24)])
    with torch.no_grad():
        scores = answer_log_probs(
            prompt_task, batch["input_ids"], batch["prompt_length"], prompt_task.answer_ids
        )
    expected = (scores.argmax(-1) == batch["class_label"]).float().mean()
    assert metrics["test/acc"] == pytest.approx(expected.item())
    assert metrics["test/ppl"] == pytest.approx(torch.exp(torch.tensor(metrics["test/loss"])))


def test_a_data_template_with_other_answers_is_refused_before_training(
    prompt_task, tmp_path
) -> None:
    other = PromptTemplate(answers=(" bad", " good"))
    data = RottenTomatoesPrompts(tokenizer=prompt_task.tokenizer, template=other)
    trainer = Trainer(max_steps=1, logger=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"template answers \[' bad', ' good'\] differ"):
        trainer.fit(prompt_task, datamodule=data)


def test_a_lora_target_that_matches_nothing_names_the_layers_there() -> None:
    with pytest.raises(ValueError, match=r"target_modules=\['query'\] match no module .*'q_proj'"):
        PromptClassificationTask(lora=LoRASettings(target_modules=["query"]))


def test_a_teacher_with_another_tokenizer_is_refused_before_training(
    prompt_task, minilm_tokenizer, tmp_path
) -> None:
    from lightning_3d.callbacks import Distiller

    # the same architecture and vocabulary size as SmolLM2, saved with another tokenizer
    teacher = tmp_path / "teacher"
    vocabulary = prompt_task.model.get_base_model().config.vocab_size
    LlamaForCausalLM(
        LlamaConfig(vocab_size=vocabulary, hidden_size=16, intermediate_size=32,
                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    ).save_pretrained(teacher)  # fmt: skip
    minilm_tokenizer.save_pretrained(teacher)
    data = RottenTomatoesPrompts(tokenizer=prompt_task.tokenizer, max_length=40, batch_size=2)
    trainer = Trainer(
        max_steps=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
        callbacks=[Distiller(str(teacher), alpha=0.5)],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"the teacher .*teacher has another tokenizer"):
        trainer.fit(prompt_task, datamodule=data)
