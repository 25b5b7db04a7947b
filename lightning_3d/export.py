"""Deployable models: a trained model written as a Hugging Face folder, ONNX (fp32 and int8 for
ONNX Runtime) and torchao, each checked and measured against the trained model.

:func:`export` takes the model a run produced (masked, LoRA-wrapped or QAT-converted) and:

1. makes one dense fp32 model of it: LoRA adapters merged into their base weights
   (``W + (alpha / r) * B @ A``), torchao quantized weights dequantized;
2. removes the heads and FFN neurons whose weights are all zero
   (:func:`~lightning_3d.pruning.remove_dead_units`: the logits do not change);
3. writes each format, reloads it the way a user would and runs it on ``eval_data``:
   accuracy, agreement of its predictions with the trained model's, and the largest logit
   difference;
4. times every format and PyTorch fp32 eager (the dense model before step 2) round-robin in
   this process at batch 1 and batch 32 of ``sequence_length`` tokens (median of ``rounds``);
5. writes ``report.json`` and returns an :class:`ExportReport` (``print(report.table())``).

Formats (:data:`FORMATS`):

* ``hf``: ``save_pretrained`` folder with the tokenizer; plain ``from_pretrained`` loads it.
  Transformers configs hold one head count and one FFN width for every block, so pruned heads
  stay in as zero heads and blocks keep as many neurons as the widest one (zeros too): the same
  logits, less speed-up than ONNX. :func:`~lightning_3d.pruning.load_pruned` is not needed.
* ``onnx``: ``torch.onnx.export`` of the fully pruned model, dynamic batch and sequence axes,
  inputs ``input_ids`` and ``attention_mask`` (int64), output ``logits``; checked against the
  PyTorch logits with ONNX Runtime (``atol``) before it is reported.
* ``onnx-int8``: ONNX Runtime's quantization of that graph (:data:`INT8_SCHEMES`): int8
  weights, activations quantized per call (``dynamic``) or with ranges calibrated on
  ``calibration_data`` (``static``, QDQ).
* ``torchao``: the run's torchao quantization (:mod:`lightning_3d.quantization`), re-applied to
  the pruned model with the run's recipe; loads with
  :func:`~lightning_3d.quantization.load_quantized`.

A QAT-converted model has no quantized form ONNX can hold directly: its weights are
dequantized for ``hf``/``onnx`` and re-quantized by ONNX Runtime for ``onnx-int8``; the report
says so in ``notes``.

Example:
    >>> report = export(task.model, task.tokenizer, "out", eval_data=loader)  # doctest: +SKIP
    >>> print(report.table())  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_3d.models import dequantize_four_bit, evaluation_mode
from lightning_3d.pruning import DEFAULT_EXCLUDE, remove_dead_units
from lightning_3d.quantization import (
    QuantizationRecipe,
    convert,
    dequantize,
    export_quantized,
    fake_quantized_modules,
    load_quantized,
    prepare,
    quantized_modules,
    resolve_recipe,
    select_modules,
)
from lightning_3d.vocabulary import UNSEEN_ROWS, restore_vocabulary, rows_held_apart

log = logging.getLogger(__name__)

FORMATS = ("hf", "onnx", "onnx-int8", "torchao")
INT8_SCHEMES = ("dynamic-per-channel", "dynamic", "static")
#: The default int8 scheme: measured the most accurate full-int8 scheme on MiniLM (BENCHMARKS.md).
DEFAULT_INT8_SCHEME = "dynamic-per-channel"
#: ``onnx-int8``'s bits for the token-embedding table: 8, ONNX Runtime's int8 ``Gather`` (one
#: scale for the table); 4, blocks of :data:`EMBEDDING_BLOCK` entries along the hidden axis with
#: one fp32 scale each (``GatherBlockQuantized``): 5 bits an entry with the scales.
EMBEDDING_BITS = (8, 4)
EMBEDDING_BLOCK = 32
ONNX_FILE = "model.onnx"
REPORT_FILE = "report.json"
DEPLOY_INSTALL = 'pip install "lightning-3d[deploy]"'
BASELINE = "pytorch-fp32"
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")

#: A batch as the runtimes take it: ``input_ids`` and ``attention_mask``, int64 ``[B, T]``.
Inputs = tuple[np.ndarray, np.ndarray]
#: Something that maps a batch to logits (a PyTorch model, an ONNX Runtime session).
Runner = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class FormatReport:
    """One row of the report: a format (or the PyTorch fp32 baseline) as written and measured.

    ``bytes`` counts the weight files on disk (``model.safetensors``, ``model.onnx``,
    ``quantized_model.pt``; the baseline: its fp32 parameters), not the tokenizer.
    ``agreement`` is the share of evaluated samples whose predicted class equals the trained
    model's; ``max_logit_difference`` the largest absolute logit difference to it. Latencies are
    medians in milliseconds; ``speedup_*`` is the baseline's latency over this one.
    """

    format: str
    path: str | None
    bytes: int
    accuracy: float | None = None
    agreement: float | None = None
    max_logit_difference: float | None = None
    latency_b1_ms: float | None = None
    latency_b32_ms: float | None = None
    speedup_b1: float | None = None
    speedup_b32: float | None = None


@dataclass
class ExportReport:
    """What :func:`export` wrote and measured (saved as ``report.json``)."""

    output_dir: str
    rows: list[FormatReport]
    structures: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    evaluated_samples: int = 0
    sequence_length: int = 64
    threads: int = 1
    machine: str = ""

    def row(self, name: str) -> FormatReport:
        """The row of format ``name`` (or :data:`BASELINE`)."""
        for row in self.rows:
            if row.format == name:
                return row
        raise KeyError(f"no row {name!r}; rows: {[r.format for r in self.rows]}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    def table(self) -> str:
        """A Markdown table: one line per format."""
        header = (
            "| format | MiB | smaller | accuracy % | agreement % | latency b1 ms | vs fp32 "
            "| latency b32 ms | vs fp32 |"
        )
        lines = [header, "|" + "---|" * 9]
        base = self.rows[0].bytes if self.rows else 0
        for r in self.rows:
            cells = [
                r.format,
                f"{r.bytes / 2**20:.1f}",
                f"{base / r.bytes:.2f}x" if r.bytes else "-",
                _percent(r.accuracy),
                _percent(r.agreement),
                _number(r.latency_b1_ms, ".1f"),
                _number(r.speedup_b1, ".2f", "x"),
                _number(r.latency_b32_ms, ".1f"),
                _number(r.speedup_b32, ".2f", "x"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join([*lines, *(f"- {note}" for note in self.notes)])


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _number(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


# ----------------------------------------------------------------------------- checks
def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """Validate ``formats`` (no Python package or model needed yet); return them, de-duplicated.

    Raises:
        ValueError: an unknown or no format.
        ImportError: an ONNX format without ``onnx``/``onnxruntime``/``onnxscript`` installed.
    """
    formats = tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats={list(formats)}: unknown {unknown}; choose from {FORMATS}")
    if any(f.startswith("onnx") for f in formats):
        missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
        if missing:
            raise ImportError(
                f"formats {[f for f in formats if f.startswith('onnx')]} need {missing}: "
                f"install them with {DEPLOY_INSTALL}"
            )
    return formats


def prepare_output_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Create ``path``; refuse an existing non-empty folder unless ``overwrite`` (then only
    what an export writes there is removed first).

    Raises:
        FileExistsError: ``path`` holds files and ``overwrite`` is false, or is a file.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"output {folder} is a file; give a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"output folder {folder} exists and is not empty; choose another or pass "
                "overwrite=True (--overwrite on the command line)"
            )
        for name in (*FORMATS, REPORT_FILE):
            target = folder / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ----------------------------------------------------------------------------- the model
def dense_float_model(model: nn.Module) -> tuple[nn.Module, list[str], list[str]]:
    """A copy of ``model`` as one plain fp32 Hugging Face model in eval mode, with notes on what
    was done and the names (in the copy) of the modules that were torchao-quantized.

    LoRA adapters (``peft``) are merged into their base weights; torchao quantized weights and a
    4-bit (QLoRA) base are dequantized (the values the quantized model computes with).

    Raises:
        ValueError: the model is fake-quantized (a QAT run not yet converted).
    """
    if fake_quantized_modules(model):
        raise ValueError(
            "the model is fake-quantized (QAT prepared, not converted): convert it first "
            "(QATHook.convert, or lightning_3d.quantization.convert with the run's recipe)"
        )
    notes = []
    model = copy.deepcopy(model)
    four_bit = dequantize_four_bit(model)
    if four_bit:
        notes.append(f"{len(four_bit)} 4-bit base layers de-quantized to fp32")
    converted = quantized_modules(model)
    quantized_ids = {id(model.get_submodule(name)) for name in converted}
    if converted:
        dequantize(model, converted)
        notes.append(
            f"{len(converted)} torchao-quantized modules dequantized to fp32 for hf and onnx; "
            "onnx-int8 re-quantizes them with ONNX Runtime, torchao re-applies the run's recipe"
        )
    if hasattr(model, "merge_and_unload"):  # a peft model: fold B @ A into the base weights
        model = model.merge_and_unload()
        notes.append("LoRA adapters merged into the base weights")
    names = [name for name, module in model.named_modules() if id(module) in quantized_ids]
    return model.float().eval(), notes, names


class _LogitsOnly(nn.Module):
    """``(input_ids, attention_mask) -> logits``: the signature every format exports."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def torch_runner(model: nn.Module) -> Runner:
    """A :data:`Runner` over a PyTorch model (eager, inference mode)."""
    wrapped = _LogitsOnly(model).eval()

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = wrapped(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))
        return logits.float().numpy()

    return run


def onnx_runner(path: str | os.PathLike[str], threads: int | None = None) -> Runner:
    """A :data:`Runner` over an ONNX Runtime CPU session of the file ``path``."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    # idle ONNX Runtime threads otherwise spin for a while after each call, taking the cores
    # from whatever runs next in this process (another format, PyTorch)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        return session.run(["logits"], feeds)[0]

    return run


# ----------------------------------------------------------------------------- formats
def export_onnx(
    model: nn.Module, path: str | os.PathLike[str], example: Inputs, atol: float = 1e-4
) -> float:
    """Write ``model`` to the ONNX file ``path`` (dynamic batch and sequence axes), run it with
    ONNX Runtime on ``example`` and return the largest logit difference to PyTorch.

    Raises:
        RuntimeError: the difference exceeds ``atol``.
    """
    wrapped = _LogitsOnly(model).eval()
    ids, mask = (torch.from_numpy(a) for a in example)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    axes = {0: batch, 1: sequence}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            wrapped,
            (ids, mask),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": axes, "attention_mask": axes},
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    expected = torch_runner(model)(*example)
    difference = float(np.abs(onnx_runner(path)(*example) - expected).max())
    if not difference <= atol:
        raise RuntimeError(
            f"the ONNX export {path} differs from PyTorch by {difference:.3g} in the logits "
            f"(allowed {atol:g}); please report this with your model"
        )
    return difference


def quantize_onnx_int8(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    scheme: str = DEFAULT_INT8_SCHEME,
    calibration: Iterable[Inputs] | None = None,
    embedding_bits: int = 8,
    unseen_token_bits: int | None = None,
) -> None:
    """ONNX Runtime int8 quantization of the fp32 graph ``source`` into ``target``.

    * ``dynamic``: int8 weights, one scale per tensor; activations quantized to uint8 on the fly
      from each call's own range (``MatMulInteger``), no calibration;
    * ``dynamic-per-channel``: the same with one weight scale per output channel;
    * ``static``: QDQ graph with activation ranges fixed from ``calibration`` batches
      (min/max), weights per channel (embedding tables stay fp32).

    ``embedding_bits=4`` stores the token-embedding table in 4-bit blocks instead
    (:func:`quantize_embedding_4bit`), in every scheme. A graph of a trimmed model that holds
    the unseen tokens' pretrained rows apart (:func:`held_apart_gather`) has a second table:
    ``unseen_token_bits`` sets its bits (default: ``embedding_bits``).

    Raises:
        ValueError: unknown scheme or bits, ``static`` without calibration data, or
            ``unseen_token_bits`` for a graph without rows held apart.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if scheme not in INT8_SCHEMES:
        raise ValueError(f"int8 scheme {scheme!r} is unknown; choose from {INT8_SCHEMES}")
    if embedding_bits not in EMBEDDING_BITS:
        raise ValueError(f"embedding_bits must be one of {EMBEDDING_BITS}, got {embedding_bits!r}")
    if unseen_token_bits not in (None, *EMBEDDING_BITS):
        raise ValueError(
            f"unseen_token_bits must be one of {EMBEDDING_BITS} or None, got {unseen_token_bits!r}"
        )
    graph = onnx.load(str(source))
    apart = held_apart_gather(graph)
    if unseen_token_bits is not None and apart is None:
        raise ValueError(
            f"unseen_token_bits={unseen_token_bits} sets the bits of the unseen tokens' rows "
            f"held apart, and {source} holds none apart (a model trimmed with "
            "VocabularyTrimmer(unseen='pretrained') holds them)"
        )
    apart_bits = embedding_bits if unseen_token_bits is None else unseen_token_bits
    four_bit = []  # the tables left for the 4-bit pass
    if embedding_bits == 4:
        four_bit.append(token_table_gather(graph))
    if apart is not None and apart_bits == 4:
        four_bit.append(apart)
    options = {"DefaultTensorType": 1}  # FLOAT, for tensors shape inference leaves untyped
    if scheme.startswith("dynamic"):
        quantize_dynamic(
            graph,
            str(target),
            per_channel=scheme == "dynamic-per-channel",
            weight_type=QuantType.QInt8,
            nodes_to_exclude=four_bit,
            extra_options=options,
        )
    else:
        _quantize_static(graph, target, list(calibration or []), options)
    for gather in four_bit:
        quantize_embedding_4bit(target, gather)


def _quantize_static(
    graph: Any, target: str | os.PathLike[str], batches: list[Inputs], options: dict[str, Any]
) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if not batches:
        raise ValueError("int8 scheme 'static' needs calibration batches (calibration_data)")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter({"input_ids": ids, "attention_mask": mask} for ids, mask in batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(
        graph,
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        extra_options=options,
    )


def _table_gathers(graph: Any) -> dict[str, tuple[str, int]]:
    """Each ``Gather`` of the ONNX ``graph`` that reads a 2-D float initializer: node name ->
    (initializer name, entries). Unnamed nodes get names, in place."""
    import onnx

    tables = {
        t.name: int(np.prod(t.dims))
        for t in graph.graph.initializer
        if len(t.dims) == 2 and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    }
    for index, node in enumerate(graph.graph.node):
        node.name = node.name or f"{node.op_type}_{index}"
    return {
        n.name: (n.input[0], tables[n.input[0]])
        for n in graph.graph.node
        if n.op_type == "Gather" and n.input[0] in tables
    }


def token_table_gather(graph: Any) -> str:
    """The name of the ``Gather`` in the ONNX ``graph`` (a ``ModelProto``) that reads the
    token-embedding table: the largest 2-D float initializer a ``Gather`` reads or, in a graph
    that holds rows apart (:func:`held_apart_gather`: ``NAME.unseen_weight``), the trained
    rows beside them (``NAME.weight``). Unnamed nodes get names, in place.

    Raises:
        ValueError: no ``Gather`` reads a 2-D float initializer.
    """
    reading = _table_gathers(graph)
    apart = _held_apart(reading)
    if apart is not None:
        trained = reading[apart][0].removesuffix(UNSEEN_ROWS) + "weight"
        return next(n for n, (table, _) in reading.items() if table == trained)
    if not reading:
        raise ValueError("no Gather reads a 2-D float table (a token embedding) to quantize")
    return max(reading, key=lambda n: reading[n][1])


def held_apart_gather(graph: Any) -> str | None:
    """The name of the ``Gather`` in the ONNX ``graph`` that reads the pretrained rows a trimmed
    embedding holds apart (the initializer ``NAME.unseen_weight`` of a
    :class:`~lightning_3d.vocabulary.TrimmedEmbedding` with ``unseen="pretrained"``, exported
    as it trains: two tables); ``None`` when it reads none."""
    return _held_apart(_table_gathers(graph))


def _held_apart(reading: Mapping[str, tuple[str, int]]) -> str | None:
    """:func:`held_apart_gather` of the table ``Gather``s ``reading`` (:func:`_table_gathers`)."""
    suffix = f".{UNSEEN_ROWS}"
    return next((n for n, (table, _) in reading.items() if table.endswith(suffix)), None)


def quantize_embedding_4bit(path: str | os.PathLike[str], gather: str | None = None) -> str:
    r"""Store the token-embedding table of the ONNX graph at ``path`` in 4 bits, in place: the
    ``Gather`` named ``gather`` (default: :func:`token_table_gather`) becomes ONNX Runtime's
    ``GatherBlockQuantized``, each row cut into blocks of ``B`` = :data:`EMBEDDING_BLOCK`
    entries along the hidden axis with one scale each (ONNX Runtime's symmetric scheme, ``m``
    the block's entry of largest magnitude, which is kept exactly)::

        s = m / -8,   q = clamp(round(w / s), -8, 7),   w' = q * s

    ``4 + 32 / B`` bits an entry with the fp32 scales (5 for ``B = 32``). Other tables
    (positions, token types) keep what they had. Returns the name of the new node.

    Raises:
        ValueError: no ``Gather`` reads a 2-D float initializer, or ``gather`` is not one.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(path))
    gather = gather or token_table_gather(model)
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    table = next((n for n in gathers if n.name == gather), None)
    if table is None:
        raise ValueError(f"{path} has no Gather named {gather!r}")
    config = DefaultWeightOnlyQuantConfig(
        block_size=EMBEDDING_BLOCK,
        is_symmetric=True,
        bits=4,
        quant_format=QuantFormat.QOperator,
        op_types_to_quantize=("Gather",),
        quant_axes=(("Gather", 1),),
    )
    others = [n.name for n in gathers if n is not table]
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=others, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(path), use_external_data_format=False)
    nodes = quantizer.model.model.graph.node
    return next(n.name for n in nodes if n.output[0] == table.output[0])


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _file_bytes(folder: Path, pattern: str) -> int:
    return sum(f.stat().st_size for f in folder.glob(pattern))


# ----------------------------------------------------------------------------- measuring
def batches_of(data: Iterable[Any]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """``(input_ids, attention_mask, labels or None)`` as int64 arrays from batches that are
    mappings with those keys (a ``DataLoader`` of a lightning-3d data module)."""
    out = []
    for batch in data:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError("eval_data must yield mappings with 'input_ids' and 'attention_mask'")
        ids = np.asarray(batch["input_ids"], dtype=np.int64)
        mask = batch.get("attention_mask")
        mask = np.ones_like(ids) if mask is None else np.asarray(mask, dtype=np.int64)
        labels = batch.get("labels")
        out.append((ids, mask, None if labels is None else np.asarray(labels)))
    return out


def predictions(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Predicted classes: ``argmax`` over the last axis; for per-token logits (a causal LM) the
    tokens under ``mask`` only, flattened."""
    predicted = logits.argmax(-1)
    return predicted if predicted.ndim == 1 else predicted[mask.astype(bool)]


def evaluate(
    runner: Runner,
    batches: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    reference: Sequence[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Run ``runner`` over ``batches``: its logits per batch, accuracy (when labels are given and
    the logits are per sample), agreement and largest logit difference with ``reference``."""
    logits = [runner(ids, mask) for ids, mask, _ in batches]
    result: dict[str, Any] = {"logits": logits}
    labelled = [(out, y) for out, (_, _, y) in zip(logits, batches, strict=True) if y is not None]
    if labelled and all(out.ndim == 2 for out, _ in labelled):
        correct = sum(int((out.argmax(-1) == y).sum()) for out, y in labelled)
        result["accuracy"] = correct / sum(len(y) for _, y in labelled)
    if reference is not None:
        pairs = list(zip(logits, reference, [m for _, m, _ in batches], strict=True))
        agree = sum(int((predictions(a, m) == predictions(b, m)).sum()) for a, b, m in pairs)
        result["agreement"] = agree / sum(len(predictions(b, m)) for _, b, m in pairs)
        result["max_logit_difference"] = max(float(np.abs(a - b).max()) for a, b, _ in pairs)
    return result


def latency_inputs(
    vocabulary_size: int, length: int = 64, batches: Sequence[int] = (1, 32), seed: int = 0
) -> dict[int, Inputs]:
    """Random token ids (above the special tokens) with a full attention mask, per batch size."""
    generator = np.random.default_rng(seed)
    low = min(1000, vocabulary_size // 2)
    return {
        b: (
            generator.integers(low, vocabulary_size, (b, length), dtype=np.int64),
            np.ones((b, length), dtype=np.int64),
        )
        for b in batches
    }


def round_robin_latency(
    runners: Mapping[str, Runner],
    inputs: Mapping[int, Inputs],
    rounds: int = 5,
    min_seconds: float = 0.2,
) -> dict[str, dict[int, float]]:
    """Median milliseconds per call of every runner at every batch size.

    After one warm-up call each, the runners take turns ``rounds`` times, so slow drifts of the
    machine (frequency, other load) hit all of them alike; each turn repeats the call until
    ``min_seconds`` have passed (at least once) and counts the mean.

    Example:
        >>> inputs = latency_inputs(100, length=4, batches=(1,))
        >>> timed = round_robin_latency({"sum": lambda i, m: i.sum(-1)}, inputs, 2, 0.0)
        >>> sorted(timed["sum"])
        [1]
    """
    times: dict[str, dict[int, list[float]]] = {n: {b: [] for b in inputs} for n in runners}
    for batch, (ids, mask) in inputs.items():
        for runner in runners.values():
            runner(ids, mask)
        for _ in range(rounds):
            for name, runner in runners.items():
                calls, started = 0, time.perf_counter()
                while True:
                    runner(ids, mask)
                    calls += 1
                    elapsed = time.perf_counter() - started
                    if elapsed >= min_seconds:
                        break
                times[name][batch].append(elapsed / calls)
    return {
        n: {b: 1000 * statistics.median(t) for b, t in by_batch.items() if t}
        for n, by_batch in times.items()
    }


# ----------------------------------------------------------------------------- export
def export(
    model: nn.Module,
    tokenizer: Any,
    output_dir: str | os.PathLike[str],
    formats: Sequence[str] = ("hf", "onnx", "onnx-int8"),
    eval_data: Iterable[Any] | None = None,
    *,
    quantization: str | QuantizationRecipe | None = None,
    int8_scheme: str = DEFAULT_INT8_SCHEME,
    embedding_bits: int = 8,
    unseen_token_bits: int | None = None,
    calibration_data: Iterable[Any] | None = None,
    overwrite: bool = False,
    latency_rounds: int = 5,
    sequence_length: int = 64,
    atol: float = 1e-4,
) -> ExportReport:
    """Write ``model`` in every format of ``formats`` under ``output_dir`` and measure them.

    Args:
        model: the trained Hugging Face model (``task.model``): plain, masked/pruned, LoRA-wrapped
            (``peft``) or QAT-converted (torchao). It is not changed.
        tokenizer: saved beside every format (``None``: not saved).
        output_dir: created; an existing non-empty folder needs ``overwrite``.
        formats: a subset of :data:`FORMATS`.
        eval_data: batches (mappings with ``input_ids``, ``attention_mask`` and, for accuracy,
            ``labels``), e.g. the test ``DataLoader``; ``None`` skips accuracy and agreement.
        quantization: the run's torchao recipe or preset name, needed for ``torchao`` (the
            command line takes it from the run's ``QATHook``).
        int8_scheme: ``onnx-int8`` quantization (:data:`INT8_SCHEMES`).
        embedding_bits: ``onnx-int8``'s bits for the token-embedding table
            (:data:`EMBEDDING_BITS`; 4: :func:`quantize_embedding_4bit`).
        unseen_token_bits: ``onnx-int8``'s bits for the pretrained rows a trimmed vocabulary
            holds apart (``VocabularyTrimmer(unseen="pretrained")``; default:
            ``embedding_bits``). When they differ, the int8 graph keeps the two tables the
            model trains with (two lookups and a select) instead of one of every id, e.g. the
            trained rows at 8 bits and the untrained ones at 4.
        calibration_data: batches like ``eval_data`` for ``int8_scheme="static"`` (training
            data, not the test split).
        latency_rounds: turns of the round-robin timing (0: no timing).
        sequence_length: tokens per sample in the timing.
        atol: largest ONNX-versus-PyTorch logit difference accepted.

    Raises:
        ValueError: an unknown format, scheme or bits; ``torchao`` without a quantization
            recipe; a fake-quantized model; ``unseen_token_bits`` for a model that holds no
            rows apart.
        ImportError: ONNX formats without the ``deploy`` extra.
        FileExistsError: ``output_dir`` is not empty and ``overwrite`` is false.
        RuntimeError: the ONNX graph's logits differ from PyTorch's by more than ``atol``.
    """
    formats = check_formats(formats)
    if int8_scheme not in INT8_SCHEMES:
        raise ValueError(f"int8_scheme={int8_scheme!r}; choose from {INT8_SCHEMES}")
    if embedding_bits not in EMBEDDING_BITS:
        raise ValueError(f"embedding_bits={embedding_bits!r}; choose from {EMBEDDING_BITS}")
    if unseen_token_bits not in (None, *EMBEDDING_BITS):
        raise ValueError(
            f"unseen_token_bits={unseen_token_bits!r}; choose from {EMBEDDING_BITS} or None"
        )
    if unseen_token_bits is not None and not rows_held_apart(model):
        raise ValueError(
            f"unseen_token_bits={unseen_token_bits} sets the bits of the unseen tokens' rows a "
            "trimmed vocabulary holds apart, and this model holds none apart (trim it with "
            "VocabularyTrimmer(unseen='pretrained'), or leave unseen_token_bits out)"
        )
    recipe = resolve_recipe(quantization) if isinstance(quantization, str) else quantization
    if "torchao" in formats and recipe is None:
        raise ValueError(
            "format 'torchao' holds a model quantized by QATHook: this run has no quantization "
            "recipe (pass quantization=, or use onnx-int8 for an int8 model)"
        )
    calibration = [(ids, mask) for ids, mask, _ in batches_of(calibration_data or [])]
    if "onnx-int8" in formats and int8_scheme == "static" and not calibration:
        raise ValueError(
            "int8_scheme='static' needs calibration_data: training batches (on the command "
            "line, --calibration_samples of at least 1)"
        )
    if latency_rounds < 0 or sequence_length < 1:
        raise ValueError(
            f"need latency_rounds >= 0 and sequence_length >= 1, got {latency_rounds}, "
            f"{sequence_length}"
        )
    dense, notes, quantized = dense_float_model(model)  # refuses fake quantization
    folder = prepare_output_dir(output_dir, overwrite)
    batches = batches_of(eval_data) if eval_data is not None else []
    example = _example_inputs(batches, dense, sequence_length)

    pruned = copy.deepcopy(dense)
    counts = remove_dead_units(pruned)
    two_tables = "onnx-int8" in formats and unseen_token_bits not in (None, embedding_bits)
    trimmed = copy.deepcopy(pruned) if two_tables else None  # onnx-int8's two tables
    if rows_held_apart(pruned) and restore_vocabulary(pruned):
        notes.append(
            "onnx: the trimmed embedding and the untrained rows it held apart written as one "
            "table of every token id (the same function, one Gather)"
        )
    removed = {name: list(kept) for name, kept in counts.items() if kept[0] < kept[1]}
    if removed:
        notes.append(
            f"removed {sum(b - a for a, b in removed.values())} all-zero units (heads, neurons) "
            f"in {len(removed)} structures for onnx, onnx-int8 and torchao"
        )
    with evaluation_mode(model):  # the trained model's own predictions, dropout off
        reference = [torch_runner(model)(ids, mask) for ids, mask, _ in batches]

    runners: dict[str, Runner] = {BASELINE: torch_runner(dense)}
    paths: dict[str, Path | None] = {BASELINE: None}
    sizes = {BASELINE: sum(p.numel() * p.element_size() for p in dense.parameters())}
    if "hf" in formats:
        runners["hf"], sizes["hf"] = _write_hf(dense, tokenizer, folder / "hf", notes, removed)
        paths["hf"] = folder / "hf"
    # the one-table fp32 graph: the onnx format's, and what onnx-int8 quantizes unless it keeps
    # the two tables
    needs_onnx = "onnx" in formats or ("onnx-int8" in formats and not two_tables)
    with tempfile.TemporaryDirectory() as scratch:
        fp32_onnx = (folder if "onnx" in formats else Path(scratch)) / "onnx" / ONNX_FILE
        if needs_onnx:
            difference = export_onnx(pruned, fp32_onnx, example, atol)
            log.info("ONNX export checked against PyTorch: max logit difference %.2g", difference)
        if "onnx" in formats:
            _save_tokenizer(tokenizer, fp32_onnx.parent)
            runners["onnx"], paths["onnx"] = onnx_runner(fp32_onnx), fp32_onnx.parent
            sizes["onnx"] = fp32_onnx.stat().st_size
        if "onnx-int8" in formats:
            source = fp32_onnx
            if trimmed is not None:
                source = Path(scratch) / "two-tables" / ONNX_FILE
                export_onnx(trimmed, source, example, atol)
            int8 = folder / "onnx-int8" / ONNX_FILE
            int8.parent.mkdir(parents=True)
            quantize_onnx_int8(
                source, int8, int8_scheme, calibration, embedding_bits,
                unseen_token_bits if two_tables else None,
            )  # fmt: skip
            _save_tokenizer(tokenizer, int8.parent)
            runners["onnx-int8"], paths["onnx-int8"] = onnx_runner(int8), int8.parent
            sizes["onnx-int8"] = int8.stat().st_size
            notes.append(
                f"onnx-int8: ONNX Runtime {int8_scheme} int8 quantization"
                + _table_note(
                    embedding_bits, unseen_token_bits if two_tables else None, int8_scheme
                )
            )
    if "torchao" in formats:
        assert recipe is not None
        as_is = quantized and not removed and not hasattr(model, "merge_and_unload")
        if as_is:  # the run's converted model, exactly: nothing to remove or merge
            source = copy.deepcopy(model)
        else:
            source = _quantized_copy(_groupable(pruned, dense, recipe, notes), recipe, quantized)
            notes.append(
                "torchao: the run's recipe applied to the "
                + ("pruned, " if removed else "")
                + ("merged " if hasattr(model, "merge_and_unload") else "")
                + "fp32 weights"
                + (
                    " (re-quantizing dequantized weights moves some by one step)"
                    if quantized
                    else ""
                )
            )
        export_quantized(source, folder / "torchao", recipe, float_bytes=sizes[BASELINE])
        runners["torchao"] = torch_runner(load_quantized(folder / "torchao"))
        sizes["torchao"] = _file_bytes(folder / "torchao", "*.pt")
        paths["torchao"] = folder / "torchao"
        _save_tokenizer(tokenizer, folder / "torchao")

    rows = []
    for name, runner in runners.items():
        row = FormatReport(name, None if paths[name] is None else str(paths[name]), sizes[name])
        if batches:
            measured = evaluate(runner, batches, reference)
            row.accuracy = measured.get("accuracy")
            row.agreement = measured["agreement"]
            row.max_logit_difference = measured["max_logit_difference"]
        rows.append(row)
    if latency_rounds:
        vocabulary = int(getattr(getattr(dense, "config", None), "vocab_size", 30000))
        inputs = latency_inputs(vocabulary, sequence_length)
        timed = round_robin_latency(runners, inputs, latency_rounds)
        for row in rows:
            row.latency_b1_ms, row.latency_b32_ms = timed[row.format][1], timed[row.format][32]
            row.speedup_b1 = timed[BASELINE][1] / row.latency_b1_ms
            row.speedup_b32 = timed[BASELINE][32] / row.latency_b32_ms
    report = ExportReport(
        output_dir=str(folder),
        rows=rows,
        structures=removed,
        notes=notes,
        evaluated_samples=sum(len(ids) for ids, _, _ in batches),
        sequence_length=sequence_length,
        threads=torch.get_num_threads(),
        machine=f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".strip(),
    )
    report.save(folder / REPORT_FILE)
    log.info("export written to %s", folder)
    return report


def _table_note(embedding_bits: int, unseen_token_bits: int | None, scheme: str) -> str:
    """What ``onnx-int8``'s note says of the token tables (``static`` leaves 8-bit ones fp32)."""
    form = {4: f"4-bit blocks of {EMBEDDING_BLOCK}", 8: "fp32" if scheme == "static" else "int8"}
    if unseen_token_bits is not None:
        return (
            f", the trained token rows in {form[embedding_bits]} and the pretrained rows held "
            f"apart in {form[unseen_token_bits]} (two tables, as the model trained)"
        )
    return f", the token-embedding table in {form[4]}" if embedding_bits == 4 else ""


def _example_inputs(
    batches: Sequence[tuple[np.ndarray, np.ndarray, Any]], model: nn.Module, length: int
) -> Inputs:
    """A small real batch for the ONNX export and check (two samples of different lengths when
    ``eval_data`` has them), else random tokens."""
    if batches and batches[0][0].shape[1] >= 2:  # torch.export fixes axes of size 1
        ids, mask, _ = batches[0]
        return np.resize(ids, (2, ids.shape[1])), np.resize(mask, (2, mask.shape[1]))
    vocabulary = int(getattr(getattr(model, "config", None), "vocab_size", 30000))
    return latency_inputs(vocabulary, max(length, 2), (2,))[2]


def _write_hf(
    dense: nn.Module,
    tokenizer: Any,
    folder: Path,
    notes: list[str],
    removed: Mapping[str, Any],
) -> tuple[Runner, int]:
    """``save_pretrained`` what a config can describe; reload with plain ``from_pretrained``."""
    import transformers

    model = copy.deepcopy(dense)
    remove_dead_units(model, config_compatible=True)
    apart = rows_held_apart(model)
    if restore_vocabulary(model):
        notes.append(
            f"hf: the embedding restored to all {model.get_input_embeddings().num_embeddings} "
            "token ids for from_pretrained ("
            + (
                "ids unseen in training hold their pretrained rows, as in the trimmed model)"
                if apart
                else "ids unseen in training share the unknown token's row, as in the trimmed "
                "model); onnx and onnx-int8 keep the trimmed rows"
            )
        )
    if removed:
        kept_heads = [name for name in removed if name.endswith("heads")]
        notes.append(
            f"hf: neurons trimmed to {getattr(model.config, 'intermediate_size', '?')} per block; "
            + (
                f"removed heads of {len(kept_heads)} blocks kept as zero heads (transformers "
                "configs hold one head count for every block); onnx has them removed"
                if kept_heads
                else "no heads removed"
            )
        )
    model.save_pretrained(folder)
    _save_tokenizer(tokenizer, folder)
    architecture = model.config.architectures[0]
    loaded = getattr(transformers, architecture).from_pretrained(folder).eval()
    return torch_runner(loaded), _file_bytes(folder, "*.safetensors")


def _groupable(
    pruned: nn.Module, dense: nn.Module, recipe: QuantizationRecipe, notes: list[str]
) -> nn.Module:
    """``pruned`` when every linear input width splits into the recipe's groups, else ``dense``
    (pruned units kept as zeros), with a note."""
    group = recipe.group_size(nn.Linear)
    widths = {m.in_features for m in pruned.modules() if isinstance(m, nn.Linear)}
    if group is None or all(width % group == 0 for width in widths):
        return pruned
    notes.append(
        f"torchao: pruned units kept as zeros: the pruned widths do not split into the recipe's "
        f"groups of {group} input columns"
    )
    return dense


def _quantized_copy(
    model: nn.Module, recipe: QuantizationRecipe, names: Sequence[str]
) -> nn.Module:
    """A copy of ``model`` with the modules ``names`` (by default those ``QATHook`` selects)
    quantized by ``recipe``."""
    model = copy.deepcopy(model)
    prepare(model, recipe, names or select_modules(model, exclude=DEFAULT_EXCLUDE))
    convert(model, recipe)
    return model


__all__ = [
    "BASELINE",
    "DEFAULT_INT8_SCHEME",
    "EMBEDDING_BITS",
    "EMBEDDING_BLOCK",
    "FORMATS",
    "INT8_SCHEMES",
    "ExportReport",
    "FormatReport",
    "batches_of",
    "check_formats",
    "dense_float_model",
    "evaluate",
    "export",
    "export_onnx",
    "held_apart_gather",
    "latency_inputs",
    "onnx_runner",
    "prepare_output_dir",
    "quantize_embedding_4bit",
    "quantize_onnx_int8",
    "round_robin_latency",
    "token_table_gather",
    "torch_runner",
]
