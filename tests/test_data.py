"""Data modules: real Rotten Tomatoes and Hamlet, checked against independent computations."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_3d.assets import ROTTEN_TOMATOES_CSV, asset_path
from lightning_3d.data import (
    IGNORE_INDEX,
    PaddingCollator,
    PlainTextLM,
    RottenTomatoes,
    chunk_blocks,
    contiguous_split,
    deduplicate,
    stratified_split,
    stratified_subset,
)


# -- pure helpers ------------------------------------------------------------------------------
def test_deduplicate_keeps_first_and_drops_conflicts() -> None:
    texts = ["good  film", "good film", "bad", "mixed", "mixed", "", "bad"]
    labels = [1, 1, 0, 1, 0, 1, 0]
    assert deduplicate(texts, labels) == (["good film", "bad"], [1, 0])


def test_stratified_split_hand_worked() -> None:
    labels = [0] * 10 + [1] * 30
    train, val, test = stratified_split(labels, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert (len(train), len(val), len(test)) == (28, 4, 8)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(40))
    for part, expected_zeros in ((val, 1), (test, 2), (train, 7)):
        assert int((np.asarray(labels)[part] == 0).sum()) == expected_zeros
    again = stratified_split(labels, 0.1, 0.2, seed=3)
    other = stratified_split(labels, 0.1, 0.2, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    assert not np.array_equal(val, other[1])


def test_stratified_subset_hand_worked() -> None:
    labels = [0] * 5 + [1] * 3 + [2] * 2  # shares 5/10, 3/10, 2/10 of a subset of 4: 2, 1.2, 0.8
    chosen = stratified_subset(labels, 4, seed=0)
    picked = [labels[i] for i in chosen]
    assert sorted(picked) == [0, 0, 1, 2]  # floors 2, 1, 0; the one left goes to 0.8 (label 2)
    assert list(chosen) == sorted(set(chosen.tolist()))
    assert list(stratified_subset(labels, 4, seed=0)) == list(chosen)
    draws = {tuple(stratified_subset(labels, 4, seed=s)) for s in range(10)}
    assert len(draws) > 1  # the members are random, the shares are not
    with pytest.raises(ValueError, match="a subset of 11 items does not fit 10 items"):
        stratified_subset(labels, 11, seed=0)


def test_train_samples_keeps_a_seeded_subset_of_the_training_split(
    minilm_tokenizer, rotten_tomatoes
) -> None:
    data = RottenTomatoes(tokenizer=minilm_tokenizer, train_samples=400)
    data.setup("fit")
    whole = rotten_tomatoes.texts["train"]
    assert len(data.splits["train"]) == len(data.texts["train"]) == 400
    assert set(data.texts["train"]) <= set(whole)
    assert data.texts["val"] == rotten_tomatoes.texts["val"]  # held-out splits stay whole
    assert data.texts["test"] == rotten_tomatoes.texts["test"]
    whole_positive = np.mean(rotten_tomatoes.splits["train"].labels)
    assert abs(np.mean(data.splits["train"].labels) - whole_positive) < 1 / 400
    again = RottenTomatoes(tokenizer=minilm_tokenizer, train_samples=400)
    again.setup("fit")
    assert again.texts["train"] == data.texts["train"]
    too_many = RottenTomatoes(tokenizer=minilm_tokenizer, train_samples=len(whole) + 1)
    with pytest.raises(ValueError, match=f"train_samples={len(whole) + 1} is more than the"):
        too_many.setup("fit")


def test_chunk_and_contiguous_split() -> None:
    blocks = chunk_blocks(torch.arange(10), 4)
    assert [b.tolist() for b in blocks] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert chunk_blocks(torch.arange(3), 4) == []
    assert contiguous_split(10, 0.2, 0.1) == (range(0, 7), range(7, 9), range(9, 10))


def test_padding_collator_pads_ids_masks_and_sequence_labels() -> None:
    collate = PaddingCollator(pad_token_id=0)
    items = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([5, 6, 7]), "index": 4},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "index": 9},
    ]
    batch = collate(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["index"].tolist() == [4, 9]


# -- Rotten Tomatoes -----------------------------------------------------------------------------
def _independent_labelled_corpus() -> pd.DataFrame:
    """De-duplicated labelled rows computed with pandas alone (fresh=1, rotten=0, no plot)."""
    frame = pd.read_csv(asset_path(ROTTEN_TOMATOES_CSV))
    frame = frame[frame.category != "plot"].copy()
    frame["text"] = frame.text.astype(str).str.split().str.join(" ")
    frame = frame[frame.text != ""]
    frame["label"] = (frame.category == "fresh").astype(int)
    consistent = frame.groupby("text").label.nunique() == 1
    frame = frame[frame.text.isin(consistent[consistent].index)]
    return frame.drop_duplicates("text")


def test_split_sizes_cover_the_deduplicated_corpus(rotten_tomatoes) -> None:
    corpus = _independent_labelled_corpus()
    sizes = {split: len(ds) for split, ds in rotten_tomatoes.splits.items()}
    assert sum(sizes.values()) == len(corpus)
    assert 12_000 < len(corpus) < 12_808  # about 12.8k labelled rows before de-duplication
    for split in ("val", "test"):
        per_class = corpus.label.value_counts()
        assert sizes[split] == sum(round(n * 0.1) for n in per_class)
    all_texts = sorted(t for texts in rotten_tomatoes.texts.values() for t in texts)
    assert all_texts == sorted(corpus.text)


def test_label_balance_is_the_same_in_every_split(rotten_tomatoes) -> None:
    corpus_positive = _independent_labelled_corpus().label.mean()
    for split, dataset in rotten_tomatoes.splits.items():
        positive = np.mean(dataset.labels)
        assert abs(positive - corpus_positive) < 0.002, split
    assert rotten_tomatoes.label_names == ["rotten", "fresh"]
    assert rotten_tomatoes.num_labels == 2


def test_no_text_in_two_splits(rotten_tomatoes) -> None:
    train, val, test = (set(rotten_tomatoes.texts[s]) for s in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    assert len(train) == len(rotten_tomatoes.texts["train"])  # no duplicates inside a split


def test_same_seed_same_split_other_seed_other_split(minilm_tokenizer, rotten_tomatoes) -> None:
    same = RottenTomatoes(tokenizer=minilm_tokenizer)
    same.setup("fit")
    assert same.texts == rotten_tomatoes.texts
    other = RottenTomatoes(tokenizer=minilm_tokenizer, split_seed=7)
    other.setup("fit")
    assert set(other.texts["val"]) != set(rotten_tomatoes.texts["val"])
    assert len(other.texts["val"]) == len(rotten_tomatoes.texts["val"])


def test_batches_are_padded_tokenized_and_carry_indices(rotten_tomatoes, minilm_tokenizer) -> None:
    batch = next(iter(rotten_tomatoes.train_dataloader()))
    dataset = rotten_tomatoes.splits["train"]
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 8 and batch["labels"].shape == (8,)
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max())
    for row, index in enumerate(batch["index"].tolist()):
        item = dataset[index]
        assert item["index"] == index
        assert batch["input_ids"][row, : lengths[row]].tolist() == item["input_ids"].tolist()
        assert batch["labels"][row] == item["labels"]
        expected = minilm_tokenizer(
            rotten_tomatoes.texts["train"][index], truncation=True, max_length=128
        )["input_ids"]
        assert item["input_ids"].tolist() == expected
    assert int(batch["input_ids"][lengths.argmin(), -1]) == minilm_tokenizer.pad_token_id or (
        lengths.min() == lengths.max()
    )


def test_tokenization_is_cached_and_keyed_by_max_length(tmp_path, minilm_tokenizer) -> None:
    data = RottenTomatoes(tokenizer=minilm_tokenizer, cache_dir=str(tmp_path))
    data.setup("fit")
    files = sorted((tmp_path / "tokenized").iterdir())
    assert len(files) == 3  # one per split
    again = RottenTomatoes(tokenizer=minilm_tokenizer, cache_dir=str(tmp_path))
    again.setup("fit")
    assert sorted((tmp_path / "tokenized").iterdir()) == files
    first = [t.tolist() for t in data.splits["val"].input_ids]
    assert [t.tolist() for t in again.splits["val"].input_ids] == first
    short = RottenTomatoes(tokenizer=minilm_tokenizer, cache_dir=str(tmp_path), max_length=8)
    short.setup("fit")
    assert len(list((tmp_path / "tokenized").iterdir())) == 6
    assert max(len(t) for t in short.splits["train"].input_ids) == 8


def test_user_csv_with_string_labels(tmp_path, minilm_tokenizer) -> None:
    rows = [
        (f"review number {i} was {'great' if i % 3 else 'dull'}", "pos" if i % 3 else "neg")
        for i in range(60)
    ]
    path = tmp_path / "reviews.csv"
    pd.DataFrame(rows + rows[:5], columns=["sentence", "verdict"]).to_csv(path, index=False)
    data = RottenTomatoes(
        tokenizer=minilm_tokenizer,
        data_files=str(path),
        text_column="sentence",
        label_column="verdict",
        val_fraction=0.2,
        test_fraction=0.2,
    )
    data.setup("fit")
    assert data.label_names == ["neg", "pos"]
    assert sum(len(d) for d in data.splits.values()) == 60  # the 5 repeated rows are dropped
    assert (len(data.splits["val"]), len(data.splits["test"])) == (12, 12)
    label_of = dict(rows)
    for split, texts in data.texts.items():
        assert data.splits[split].labels == [int(label_of[t] == "pos") for t in texts]


def test_user_files_with_their_own_splits_are_kept(tmp_path, minilm_tokenizer) -> None:
    files = {}
    for split, n in (("train", 6), ("validation", 3), ("test", 2)):
        path = tmp_path / f"{split}.jsonl"
        path.write_text(
            "".join(json.dumps({"text": f"{split} {i}", "label": i % 2}) + "\n" for i in range(n))
        )
        files[split] = str(path)
    data = RottenTomatoes(tokenizer=minilm_tokenizer, data_files=files)
    data.setup("fit")
    assert data.texts["val"] == ["validation 0", "validation 1", "validation 2"]
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [6, 3, 2]


def test_missing_column_is_named(tmp_path, minilm_tokenizer) -> None:
    path = tmp_path / "d.csv"
    pd.DataFrame({"review": ["a", "b"], "label": [0, 1]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"no column 'text'.*\['review', 'label'\]"):
        RottenTomatoes(tokenizer=minilm_tokenizer, data_files=str(path)).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"val_fraction": 1.5}, ValueError, r"val_fraction must be in \[0, 1\), got 1.5"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, ValueError, "sum < 1"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive integer, got 0"),
        ({"max_length": -3}, ValueError, "max_length must be a positive integer, got -3"),
        ({"train_samples": 0}, ValueError, "train_samples must be a positive integer, got 0"),
        ({"num_workers": -1}, ValueError, "num_workers must be >= 0"),
        ({"dataset": "imdb", "data_files": "x.csv"}, ValueError, "not both"),
        ({"data_files": "/no/such/file.csv"}, FileNotFoundError, "'/no/such/file.csv' does not"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        RottenTomatoes(**kwargs)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("reviews.csv", "text,label\n\n", "has a header and no rows"),
        ("reviews.tsv", "text\tlabel\n", "has a header and no rows"),
        ("reviews.jsonl", "\n", "has no rows"),
        ("reviews.csv", "", "has a header and no rows"),
    ],
)
def test_an_empty_data_file_is_named_at_construction(tmp_path, name, content, message) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=f"data file '{path}' {message}"):
        RottenTomatoes(data_files={"train": str(path)})


def test_a_data_file_with_one_row_is_accepted(tmp_path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\ngood film,1\n")
    assert RottenTomatoes(data_files=str(path)).hparams.data_files == str(path)


# -- plain-text LM -------------------------------------------------------------------------------
def test_hamlet_blocks_are_contiguous_and_disjoint(smollm2_tokenizer) -> None:
    data = PlainTextLM(tokenizer=smollm2_tokenizer, block_size=64, batch_size=2)
    data.setup("fit")
    sizes = [len(data.splits[s]) for s in ("train", "val", "test")]
    total = sum(sizes)
    assert sizes == [total - 2 * round(total * 0.05), round(total * 0.05), round(total * 0.05)]
    stream = torch.cat(
        [item for s in ("train", "val", "test") for item in data.splits[s].input_ids]
    )
    text = asset_path(ROTTEN_TOMATOES_CSV).parent.joinpath("hamlet.txt").read_text()
    ids = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = [*ids, smollm2_tokenizer.eos_token_id]  # documents end with EOS
    assert stream.tolist() == expected[: total * 64]
    batch = next(iter(data.val_dataloader()))
    assert batch["input_ids"].shape == (4, 64)
    assert torch.equal(batch["labels"], batch["input_ids"])


def test_user_text_files_and_too_short_text(tmp_path, smollm2_tokenizer) -> None:
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    (tmp_path / "b.txt").write_text("a stitch in time saves nine. " * 40)
    data = PlainTextLM(
        tokenizer=smollm2_tokenizer,
        text_files=str(tmp_path / "*.txt"),
        block_size=16,
        val_fraction=0.1,
        test_fraction=0.1,
    )
    data.setup("fit")
    assert all(len(ids) == 16 for ids in data.splits["train"].input_ids)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short")
    with pytest.raises(ValueError, match="too few for train/val/test blocks of block_size=16"):
        PlainTextLM(tokenizer=smollm2_tokenizer, text_files=str(tiny), block_size=16).setup("fit")


# -- properties of the split helpers ----------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=1, max_size=200),
    val_fraction=st.floats(0.0, 0.45),
    test_fraction=st.floats(0.0, 0.45),
    seed=st.integers(0, 2**31 - 1),
)
def test_stratified_split_partitions_every_class(labels, val_fraction, test_fraction, seed) -> None:
    train, val, test = stratified_split(labels, val_fraction, test_fraction, seed)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(len(labels)))
    label_array = np.asarray(labels)
    for label in set(labels):
        members = int((label_array == label).sum())
        assert int((label_array[val] == label).sum()) == round(members * val_fraction)
        assert int((label_array[test] == label).sum()) == round(members * test_fraction)


@settings(max_examples=60, deadline=None)
@given(count=st.integers(0, 500), val_fraction=st.floats(0, 0.45), test_fraction=st.floats(0, 0.45))
def test_contiguous_split_is_an_ordered_partition(count, val_fraction, test_fraction) -> None:
    train, val, test = contiguous_split(count, val_fraction, test_fraction)
    assert [*train, *val, *test] == list(range(count))
