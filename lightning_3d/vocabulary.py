"""Vocabulary trimming: keep only the word-embedding rows of the tokens a fine-tune can see.

A pretrained encoder carries an embedding row for every token of its tokenizer (30,522 for
all-MiniLM-L6-v2: 11.7M of its 22.7M parameters), while one task's training data uses a part of
them (13,668 on the Rotten Tomatoes training split). A row whose token never occurs in training
gets no gradient, so training does not change it (AdamW's update of a row with zero gradients
is zero; only weight decay shrinks it); dropping such rows makes the exported model smaller
at no training cost. The one change of function: a token that occurs only after training
(at test time) is read as the unknown token instead of through its pretrained row; with
``unseen="pretrained"`` it keeps its pretrained row (held apart, outside the optimizer), so
the model computes what the untrimmed one does and trimming only saves training time.

The model keeps taking the tokenizer's ids: :class:`TrimmedEmbedding` looks each id up in a
table ``rows`` (one entry per tokenizer id) and then in the kept rows::

    embedding(i) = weight[rows[i]]
    rows[i] = position of i among the kept ids, or the unknown token's position

so no tokenizer changes, and an ONNX export of the model holds the table as one more ``Gather``.
:func:`restore_vocabulary` gives back a plain ``nn.Embedding`` of the tokenizer's size (dropped
ids share the unknown token's row, or hold their pretrained rows: the same function), which
``from_pretrained`` can load.

Example:
    >>> import torch
    >>> embedding = torch.nn.Embedding(6, 2)
    >>> trimmed = trim_embedding(embedding, torch.tensor([0, 2, 5]), unknown_id=0)
    >>> trimmed.token_rows.tolist()  # ids 1, 3 and 4 were never seen: they read id 0's row
    [0, 0, 1, 0, 0, 2]
    >>> bool(torch.equal(trimmed(torch.tensor([5, 4])), embedding.weight[[5, 0]]))
    True
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: Name of the id-to-row table in a :class:`TrimmedEmbedding`'s state (what a checkpoint of a
#: trimmed model holds beside the kept rows' ``weight``).
ROWS = "token_rows"
#: Name of the untrained rows a :class:`TrimmedEmbedding` holds apart (``unseen="pretrained"``).
UNSEEN_ROWS = "unseen_weight"


class TrimmedEmbedding(nn.Module):
    """An embedding of the tokenizer's ids that trains rows for a subset of them.

    ``weight`` holds the ``K`` kept rows; the buffer ``token_rows`` (one entry per tokenizer
    id, saved with the model) maps each id to its row, an id that was not kept to the unknown
    token's row. With ``unseen_weight`` (``U`` rows, a buffer: saved, never trained), an entry
    ``K + j`` of ``token_rows`` reads its row ``j`` instead::

        embedding(i) = weight[rows[i]]            if rows[i] < K
                       unseen_weight[rows[i] - K]  otherwise

    ``padding_idx`` (a tokenizer id, as in ``nn.Embedding``) keeps its row's gradient at zero.

    Example:
        >>> rows = torch.tensor([0, 0, 1])  # 3 tokenizer ids, 2 kept rows
        >>> TrimmedEmbedding(torch.ones(2, 4), rows)(torch.tensor([[2, 1]])).shape
        torch.Size([1, 2, 4])
        >>> apart = TrimmedEmbedding(torch.ones(2, 1), torch.tensor([0, 2, 1]), None,
        ...                          unseen_weight=torch.full((1, 1), 7.0))
        >>> apart(torch.tensor([0, 1, 2])).flatten().tolist()  # id 1 reads its own row
        [1.0, 7.0, 1.0]
    """

    def __init__(
        self,
        weight: torch.Tensor,
        rows: torch.Tensor,
        padding_idx: int | None = None,
        unseen_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if weight.dim() != 2 or rows.dim() != 1 or rows.dtype != torch.long:
            raise ValueError(
                "TrimmedEmbedding needs a 2-D weight and a 1-D int64 rows table, got shapes "
                f"{tuple(weight.shape)} and {tuple(rows.shape)} ({rows.dtype})"
            )
        stored = len(weight) + (0 if unseen_weight is None else len(unseen_weight))
        if unseen_weight is not None and (
            unseen_weight.dim() != 2 or unseen_weight.shape[1] != weight.shape[1]
        ):
            raise ValueError(
                f"unseen_weight must hold rows of width {weight.shape[1]}, got shape "
                f"{tuple(unseen_weight.shape)}"
            )
        if len(rows) and not 0 <= int(rows.min()) <= int(rows.max()) < stored:
            raise ValueError(f"rows must index the {stored} stored rows")
        self.weight = nn.Parameter(weight.detach().clone())
        self.register_buffer(ROWS, rows.clone())
        unseen = None if unseen_weight is None else unseen_weight.detach().clone()
        self.register_buffer(UNSEEN_ROWS, unseen)
        self.padding_idx = padding_idx
        self.padding_row = None if padding_idx is None else int(rows[padding_idx])
        if self.padding_row is not None and self.padding_row >= len(weight):
            raise ValueError(f"the padding id {padding_idx} must be among the kept rows")

    @property
    def num_embeddings(self) -> int:
        """The tokenizer's ids this embedding takes (as ``nn.Embedding.num_embeddings``)."""
        return len(self.token_rows)

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def kept(self) -> int:
        """How many rows are stored."""
        return self.weight.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.token_rows[input_ids]
        unseen = self.unseen_weight
        if unseen is None:
            return F.embedding(rows, self.weight, self.padding_row)
        # both lookups for every id (no data-dependent branch: no host sync, one ONNX graph);
        # the clamped rows an id does not use get no gradient through the where
        trained = F.embedding(rows.clamp(max=self.kept - 1), self.weight, self.padding_row)
        apart = F.embedding((rows - self.kept).clamp(min=0), unseen)
        return torch.where((rows < self.kept).unsqueeze(-1), trained, apart)

    def full(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` over every tokenizer id computing the same function (ids
        that were not kept get a copy of the unknown token's row, or their row held apart)."""
        full = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx)
        full = full.to(device=self.weight.device, dtype=self.weight.dtype)
        stored = self.weight.detach()
        if self.unseen_weight is not None:
            stored = torch.cat([stored, self.unseen_weight.to(stored.dtype)])
        with torch.no_grad():
            full.weight.copy_(stored[self.token_rows])
        full.weight.requires_grad_(self.weight.requires_grad)
        return full

    def extra_repr(self) -> str:
        apart = "" if self.unseen_weight is None else f", {len(self.unseen_weight)} held apart"
        return f"{self.num_embeddings} ids, {self.kept} rows kept{apart}, dim {self.embedding_dim}"


def observed_token_ids(
    batches: Iterable[Any], always: Iterable[int] = (), key: str = "input_ids"
) -> torch.Tensor:
    """The sorted distinct token ids in ``batches`` (mappings with ``key``, or id tensors) and
    in ``always`` (e.g. the tokenizer's special tokens). ``batches`` is read under
    ``torch.random.fork_rng``: a shuffling loader's draw from torch's global random state (which
    the training's own shuffle then draws from) is undone; a loader's own ``generator`` and
    other libraries' random states are not.

    Example:
        >>> observed_token_ids([{"input_ids": torch.tensor([[5, 3, 0]])}, torch.tensor([3, 9])],
        ...                    always=[1]).tolist()
        [0, 1, 3, 5, 9]
    """
    seen = [torch.as_tensor(list(always), dtype=torch.long)]
    with torch.random.fork_rng(devices=[]):
        for batch in batches:
            ids = batch[key] if isinstance(batch, Mapping) else batch
            seen.append(torch.as_tensor(ids).reshape(-1).long().unique())
    return torch.cat(seen).unique()


#: What an id that was not kept reads (``unseen=``): the unknown token's row, the row of the
#: kept token nearest to its own pretrained row, or its own pretrained row held apart (untrained).
UNSEEN = ("unknown", "nearest", "pretrained")


def nearest_kept(weight: torch.Tensor, kept: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    r"""For every row of ``weight`` (one per tokenizer id), the position among the sorted
    ``kept`` ids of the kept id whose row is most similar to it by cosine similarity::

        nearest(i) = argmax_k  <w_i, w_k> / (|w_i| |w_k|)     over k in kept

    (a kept id is its own nearest). Computed ``chunk`` ids at a time.

    Example:
        >>> weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.8]])
        >>> nearest_kept(weight, torch.tensor([0, 1])).tolist()
        [0, 1, 0, 1]
    """
    unit = F.normalize(weight.detach().float(), dim=1)
    anchors = unit[torch.as_tensor(kept, device=weight.device)]
    return torch.cat([(part @ anchors.T).argmax(dim=1) for part in unit.split(chunk)]).cpu()


def _checked(kept: torch.Tensor, vocabulary_size: int) -> torch.Tensor:
    """``kept`` as a CPU int64 tensor, refused unless sorted, distinct and within the ids."""
    kept = torch.as_tensor(kept, dtype=torch.long).cpu()
    if kept.dim() != 1 or len(kept) == 0 or bool((kept[1:] <= kept[:-1]).any()):
        raise ValueError("kept must be a non-empty, sorted 1-D tensor of distinct token ids")
    if int(kept[0]) < 0 or int(kept[-1]) >= vocabulary_size:
        raise ValueError(
            f"kept ids must lie in [0, {vocabulary_size}), got {int(kept[0])}..{int(kept[-1])}"
        )
    return kept


def every_sample(loader: Any, batch_size: int = 64) -> Any:
    """Batches holding every sample of ``loader``'s dataset once, in order: a ``DataLoader``
    over the same dataset and collate function without its sampler (an epoch's sampler may
    visit a part of the data, e.g. under a data budget); anything else as it is.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> [b.tolist() for b in every_sample(DataLoader(range(5), batch_size=2, shuffle=True))]
        [[0, 1], [2, 3], [4]]
    """
    from torch.utils.data import DataLoader

    if not isinstance(loader, DataLoader):
        return loader
    if loader.batch_size is None and loader.batch_sampler is None:  # its items are batches
        return DataLoader(loader.dataset, batch_size=None, collate_fn=loader.collate_fn)
    size = loader.batch_size or batch_size  # a batch sampler of its own: read in chunks
    return DataLoader(loader.dataset, batch_size=size, collate_fn=loader.collate_fn)


def row_table(
    kept: torch.Tensor,
    vocabulary_size: int,
    unknown_id: int,
    nearest: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rows`` of :class:`TrimmedEmbedding`: each id's position in the sorted ``kept`` ids;
    for an id not kept, the unknown token's position, or ``nearest[id]`` when given (e.g.
    :func:`nearest_kept`). ``unknown_id`` must be kept.

    Example:
        >>> row_table(torch.tensor([1, 3]), 5, unknown_id=1).tolist()
        [0, 0, 0, 1, 0]
        >>> row_table(torch.tensor([1, 3]), 5, 1, nearest=torch.tensor([1, 0, 1, 1, 1])).tolist()
        [1, 0, 1, 1, 1]
    """
    kept = _checked(kept, vocabulary_size)
    position = torch.searchsorted(kept, torch.tensor([unknown_id]))
    if int(position) >= len(kept) or int(kept[position]) != unknown_id:
        raise ValueError(f"unknown_id={unknown_id} must be among the kept ids")
    if nearest is None:
        rows = torch.full((vocabulary_size,), int(position), dtype=torch.long)
    elif nearest.shape != (vocabulary_size,):
        raise ValueError(f"nearest must hold one row per id ({vocabulary_size})")
    else:
        rows = nearest.to(dtype=torch.long, device="cpu").clone()
    rows[kept] = torch.arange(len(kept))
    return rows


def trim_embedding(
    embedding: nn.Embedding, kept: torch.Tensor, unknown_id: int, unseen: str = "unknown"
) -> TrimmedEmbedding:
    """A :class:`TrimmedEmbedding` training ``embedding``'s rows of the ``kept`` ids (sorted,
    distinct, the unknown token's among them); an id not kept reads the unknown token's row
    (``unseen="unknown"``), that of the kept id nearest to its own row (``"nearest"``,
    :func:`nearest_kept` on ``embedding``'s rows), or its own row, held apart and never trained
    (``"pretrained"``)."""
    if type(embedding) is not nn.Embedding:  # a subclass may scale or otherwise change rows
        raise ValueError(
            f"trimming needs a plain nn.Embedding, got {type(embedding).__name__} (a subclass "
            "may compute more than a row lookup)"
        )
    if unseen not in UNSEEN:
        raise ValueError(f"unseen must be one of {UNSEEN}, got {unseen!r}")
    kept = _checked(kept, embedding.num_embeddings)
    nearest = nearest_kept(embedding.weight, kept) if unseen == "nearest" else None
    rows = row_table(kept, embedding.num_embeddings, unknown_id, nearest)
    rows = rows.to(embedding.weight.device)
    kept = kept.to(embedding.weight.device)
    padding = embedding.padding_idx
    if padding is not None and not bool((kept == padding).any()):
        raise ValueError(f"the padding id {padding} must be among the kept ids")
    apart = None
    if unseen == "pretrained":
        dropped = torch.ones(embedding.num_embeddings, dtype=torch.bool, device=kept.device)
        dropped[kept] = False
        apart = embedding.weight.detach()[dropped]
        rows[dropped] = len(kept) + torch.arange(len(apart), device=rows.device)
    trimmed = TrimmedEmbedding(embedding.weight[kept], rows, embedding.padding_idx, apart)
    trimmed.weight.requires_grad_(embedding.weight.requires_grad)
    return trimmed


def _input_embedding_path(model: nn.Module) -> tuple[str, nn.Module]:
    """The name (in ``model``) and module of the model's input embedding."""
    if not callable(getattr(model, "get_input_embeddings", None)):
        raise ValueError(
            f"vocabulary trimming needs a Hugging Face model (get_input_embeddings), got "
            f"{type(model).__name__}"
        )
    embedding = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is embedding), None)
    if name is None:
        raise ValueError("the model's input embedding is not one of its modules")
    return name, embedding


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attribute, module)


def trim_vocabulary(
    model: nn.Module, kept: torch.Tensor, unknown_id: int, unseen: str = "unknown"
) -> TrimmedEmbedding:
    """Replace ``model``'s input embedding (a Hugging Face model, or a peft model around one)
    by the :class:`TrimmedEmbedding` of the ``kept`` ids, in place (``unseen``: see
    :func:`trim_embedding`); returns it.

    A model with an output vocabulary of its own (an untied language-model head) is trimmed
    with a warning: tokens it writes that were not kept read as the unknown token when fed back.

    Raises:
        ValueError: the embedding is already trimmed or is not a plain ``nn.Embedding``; its
            weight is shared with another layer (a tied language-model head: trimming would
            remove tokens the model can write); ``unknown_id`` or the padding id is not kept.
    """
    name, embedding = _input_embedding_path(model)
    if isinstance(embedding, TrimmedEmbedding):
        raise ValueError("the model's vocabulary is already trimmed")
    weight = getattr(embedding, "weight", None)
    sharing = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]
    if len(sharing) > 1:
        raise ValueError(
            f"the input embedding's weight is shared ({', '.join(sharing)}: a tied "
            "language-model head): trimming the vocabulary would remove tokens it can generate"
        )
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        warnings.warn(
            "trimming the input vocabulary of a model with an output vocabulary: tokens it "
            "generates that were not in the training data read as the unknown token",
            stacklevel=2,
        )
    trimmed = trim_embedding(embedding, kept, unknown_id, unseen)
    _replace(model, name, trimmed)
    log.info(
        "vocabulary trimmed to %d of %d token ids (%d of %d embedding parameters kept)",
        trimmed.kept,
        trimmed.num_embeddings,
        trimmed.weight.numel(),
        embedding.weight.numel(),
    )
    return trimmed


def restore_vocabulary(model: nn.Module) -> bool:
    """Put back a plain ``nn.Embedding`` of every tokenizer id (:meth:`TrimmedEmbedding.full`)
    where ``model``'s input embedding is trimmed, in place; returns whether it was (``False``
    for a model without ``get_input_embeddings``)."""
    if not callable(getattr(model, "get_input_embeddings", None)):
        return False
    name, embedding = _input_embedding_path(model)
    if not isinstance(embedding, TrimmedEmbedding):
        return False
    _replace(model, name, embedding.full())
    return True


def rows_held_apart(model: nn.Module) -> bool:
    """Whether ``model``'s input embedding is a :class:`TrimmedEmbedding` that holds the
    untrained rows apart (``unseen="pretrained"``): restoring it loses nothing in size."""
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    return isinstance(embedding, TrimmedEmbedding) and embedding.unseen_weight is not None


def trim_like_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Make ``module``'s embeddings fit ``state`` so that it loads (the load fills the
    weights): one that ``state`` holds trimmed (``NAME.token_rows`` beside ``NAME.weight``,
    and ``NAME.unseen_weight`` when it holds rows apart) becomes a :class:`TrimmedEmbedding`
    of the same rows; a :class:`TrimmedEmbedding` that
    ``state`` holds whole (``NAME.weight`` alone) becomes a plain ``nn.Embedding`` again.
    Returns the names of the embeddings it replaced.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Embedding(4, 2))
        >>> trim_like_state(model, {"0.weight": torch.zeros(2, 2),
        ...                         "0.token_rows": torch.tensor([0, 0, 1, 0])})
        ['0']
    """
    replaced = []
    for key in [key for key in state if key.endswith(f".{ROWS}")]:
        name = key.removesuffix(f".{ROWS}")
        embedding = module.get_submodule(name)
        rows, weight = state[key], state[f"{name}.weight"]
        apart = state.get(f"{name}.{UNSEEN_ROWS}")
        if (
            isinstance(embedding, TrimmedEmbedding)
            and torch.equal(embedding.token_rows.cpu(), rows.cpu())
            and _shape(embedding.unseen_weight) == _shape(apart)
        ):
            continue
        if not isinstance(embedding, nn.Embedding | TrimmedEmbedding):
            raise ValueError(f"the state trims {name}, which is a {type(embedding).__name__}")
        if len(rows) != embedding.num_embeddings:
            raise ValueError(
                f"the state trims {name} from {len(rows)} token ids, the model has "
                f"{embedding.num_embeddings}"
            )
        like = embedding.weight
        empty = torch.empty(weight.shape, dtype=like.dtype, device=like.device)
        held = None if apart is None else empty.new_empty(tuple(apart.shape))
        rows = rows.long().to(like.device)
        trimmed = TrimmedEmbedding(empty, rows, embedding.padding_idx, held)
        trimmed.weight.requires_grad_(like.requires_grad)
        _replace(module, name, trimmed)
        replaced.append(name)
    for name, embedding in list(module.named_modules()):
        whole = state.get(f"{name}.weight")
        trimmed_here = f"{name}.{ROWS}" in state
        if isinstance(embedding, TrimmedEmbedding) and whole is not None and not trimmed_here:
            if tuple(whole.shape) != (embedding.num_embeddings, embedding.embedding_dim):
                continue  # not this embedding's whole form: the load reports the mismatch
            _replace(module, name, embedding.full())
            replaced.append(name)
    return replaced


def _shape(tensor: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if tensor is None else tuple(tensor.shape)


def removed_share(model: nn.Module, kept: int) -> float:
    """The share of ``model``'s parameters that trimming its input embedding to ``kept`` rows
    removes (what :func:`~lightning_3d.budget.size_fraction` calls ``vocabulary_share``).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
        >>> model.get_input_embeddings = lambda: model[0]
        >>> removed_share(model, 5)  # 5 rows of 4 out of 60 parameters
        0.3333333333333333
    """
    _, embedding = _input_embedding_path(model)
    rows = embedding.num_embeddings
    if not 0 < kept <= rows:
        raise ValueError(f"kept must be in [1, {rows}], got {kept}")
    total = sum(p.numel() for p in model.parameters())
    return (rows - kept) * embedding.embedding_dim / total


def input_embedding_share(model: nn.Module) -> float:
    """The share of ``model``'s parameters in its input embedding (the rows it trains, for a
    :class:`TrimmedEmbedding`); 0 for a model without ``get_input_embeddings``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
        >>> model.get_input_embeddings = lambda: model[0]
        >>> input_embedding_share(model)  # 40 of 60 parameters
        0.6666666666666666
    """
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    if embedding is None:
        return 0.0
    total = sum(p.numel() for p in model.parameters())
    return embedding.weight.numel() / total


def trimmed_copy(module: nn.Module, loader: Any, tokenizer: Any) -> tuple[nn.Module, float]:
    """What a :class:`~lightning_3d.callbacks.VocabularyTrimmer` run will train, for pricing it
    before training: a deep copy of ``module`` (a Hugging Face model, or a task holding one as
    ``model``) trimmed to the ids of every sample of ``loader`` (:func:`every_sample`) and the
    tokenizer's special tokens, and the share of the parameters the trimming removes
    (:func:`removed_share`). ``module`` itself is not changed."""
    special, unknown = special_token_ids(tokenizer)
    kept = observed_token_ids(every_sample(loader), always=special)
    share = removed_share(getattr(module, "model", module), len(kept))
    copied = copy.deepcopy(module)
    trim_vocabulary(getattr(copied, "model", copied), kept, unknown)
    return copied, share


def special_token_ids(tokenizer: Any) -> tuple[list[int], int]:
    """The tokenizer's special token ids (always kept) and its unknown token's id.

    Raises:
        ValueError: the tokenizer has no unknown token (its ids then cannot fall back to one).
    """
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is None:
        raise ValueError(
            f"vocabulary trimming maps tokens unseen in training to the unknown token: "
            f"{type(tokenizer).__name__} has none (unk_token_id is None)"
        )
    return sorted({*getattr(tokenizer, "all_special_ids", ()), int(unknown)}), int(unknown)


__all__: Sequence[str] = [
    "ROWS",
    "UNSEEN",
    "UNSEEN_ROWS",
    "TrimmedEmbedding",
    "every_sample",
    "input_embedding_share",
    "nearest_kept",
    "observed_token_ids",
    "removed_share",
    "restore_vocabulary",
    "row_table",
    "rows_held_apart",
    "special_token_ids",
    "trim_embedding",
    "trim_like_state",
    "trim_vocabulary",
    "trimmed_copy",
]
