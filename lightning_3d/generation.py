"""Causal LMs deployed for generation: ONNX Runtime GenAI, a decoder with a KV cache and
integer weights, built from the trained model by the runtime's own model builder.

:func:`export_generator` merges LoRA adapters and de-quantizes torchao weights
(:func:`~lightning_3d.export.dense_float_model`), writes a Hugging Face folder and runs
``python -m onnxruntime_genai.models.builder`` on it: every linear layer becomes a
``MatMulNBits`` with ``weight_bits`` (4 or 8) weights in blocks of ``block_size`` input columns,
one scale per block (round to nearest), activations quantized to int8 in the product
(``accuracy_level=4``); ``weight_bits=None`` keeps fp32. The folder holds ``model.onnx``, its
weights, ``genai_config.json`` and the tokenizer; ``onnxruntime_genai.Model(folder)`` loads it.
``lora="separate"`` keeps LoRA adapters as float products beside the integer base instead of
merging them: the deployment of a base trained on the runtime's grid (:func:`runtime_grid`,
``LoRASettings(base_quantization="int4")``), which the int4 decoder then reproduces exactly.
An int4-grid base exported at 8 bits or fp32 is exact too (every int4 value lies on the int8
grid of the same block).

:func:`answer_accuracy` scores a prompt-classification test in that runtime (the answer of highest
log-probability, as :func:`~lightning_3d.tasks.answer_log_probs` does in PyTorch), so the
deployed model's accuracy is measured, not assumed; :func:`tokens_per_second` times greedy
generation at batch 1. Install with ``pip install "lightning-3d[deploy]"``.

Example:
    >>> built = export_generator(model, tokenizer, "out/int4", weight_bits=4)  # doctest: +SKIP
    >>> answer_accuracy(built.path, prompts, answer_ids, labels)  # doctest: +SKIP
    0.87
    >>> tokens_per_second(built.path, prompts[0])  # doctest: +SKIP
    61.2
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

#: Weight bits the builder writes as integers (``None``: fp32 weights).
WEIGHT_BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)
#: ``lightning-3d export`` formats of a causal LM for generation, and their weight bits.
GENERATOR_FORMATS = {"genai-fp32": None, "genai-int8": 8, "genai-int4": 4}
GENERATOR_REPORT_FILE = "generation_report.json"
#: How ``export_generator`` deploys LoRA adapters: folded into the base, or beside it.
LORA_DEPLOYMENTS = ("merge", "separate")
#: Tokens generated per timing round.
NEW_TOKENS = 64


@dataclass(frozen=True)
class GeneratorExport:
    """A model folder for ONNX Runtime GenAI.

    Attributes:
        path: the folder (``onnxruntime_genai.Model(path)``).
        weight_bits: 4, 8, or ``None`` for fp32 weights.
        bytes: size of every file in the folder.
    """

    path: Path
    weight_bits: int | None
    bytes: int


def check_generator_arguments(
    weight_bits: int | None, block_size: int, embedding_bits: int | None = None
) -> None:
    """Refuse weight bits and block sizes the builder has no kernel for, and a missing runtime.

    Raises:
        ValueError: ``weight_bits`` not in :data:`WEIGHT_BITS` or ``None``; ``block_size`` not
            in :data:`BLOCK_SIZES`; ``embedding_bits`` other than ``None``, ``weight_bits``, or
            4 under 8-bit weights (the runtime's token table is int4 or the weights' int8).
        ImportError: ``onnxruntime-genai`` is not installed (the ``deploy`` extra).

    Example:
        >>> check_generator_arguments(3, 32)
        Traceback (most recent call last):
        ...
        ValueError: weight_bits must be one of (4, 8) or None (fp32), got 3
    """
    if weight_bits is not None and weight_bits not in WEIGHT_BITS:
        raise ValueError(
            f"weight_bits must be one of {WEIGHT_BITS} or None (fp32), got {weight_bits}"
        )
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    if embedding_bits not in (None, weight_bits) and (weight_bits, embedding_bits) != (8, 4):
        raise ValueError(
            f"embedding_bits={embedding_bits} with weight_bits={weight_bits}: the token table "
            "can only be stored in 4 bits below 8-bit weights (ONNX Runtime GenAI quantizes "
            "embeddings to int4, or to int8 with 8-bit weights); use None for the weights' bits"
        )
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise ImportError(
            "exporting a generator needs onnxruntime-genai: pip install 'lightning-3d[deploy]'"
        )


def adapter_product_names(model: nn.Module) -> list[str]:
    """The builder's names of the two products ``A x`` and ``B (A x)`` of every LoRA adapter of
    ``model`` (``/model/layers.{i}/attn/q_proj/lora_A/MatMul``, ...), kept unquantized by
    ``export_generator(..., lora="separate")``.

    Raises:
        ValueError: ``model`` is not a peft model with LoRA adapters, or has one outside the
            decoder blocks' attention and MLP projections (the builder has no adapter path
            there).
    """
    adapted = [
        name
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and hasattr(module, "base_layer")
    ]
    if not adapted or not hasattr(model, "unload"):
        raise ValueError("lora='separate' needs a peft model with LoRA adapters")
    names = []
    for name in adapted:
        found = re.search(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)$", name)
        if found is None:
            raise ValueError(
                f"lora='separate': the adapter on {name} is outside the decoder blocks' "
                "attention and MLP projections; export with lora='merge'"
            )
        block, part, projection = found.groups()
        part = "attn" if part == "self_attn" else part
        names += [f"/model/layers.{block}/{part}/{projection}/lora_{m}/MatMul" for m in "AB"]
    return names


def runtime_grid(weight: torch.Tensor, bits: int = 4, block_size: int = 32) -> torch.Tensor:
    """``weight`` (``out x in``, a linear layer's or a tied embedding's) rounded to the grid on
    which ONNX Runtime's ``MatMulNBits`` stores it, by the runtime's own quantizer.

    Each row is cut into blocks of ``block_size`` input columns (the last one zero-padded); with
    ``m`` the block's value of largest magnitude and ``h = 2^(bits-1)``, the symmetric scheme the
    GenAI builder uses keeps ``s = m / -h``, ``q = clamp(round(w / s) + h, 0, 2h - 1)`` and
    computes with ``(q - h) s``. The result is a fixed point: rounding it again changes nothing,
    so a model trained on these values is deployed exactly (the LoRA base of
    ``LoRASettings(base_quantization="int4")``).

    Example:
        >>> row = torch.tensor([[-8.0, 1.2, -3.4, 7.6] + [0.0] * 12])
        >>> runtime_grid(row, bits=4, block_size=16)[0, :4].tolist()
        [-8.0, 1.0, -3.0, 7.0]
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    if bits not in WEIGHT_BITS or block_size not in BLOCK_SIZES or weight.dim() != 2:
        raise ValueError(
            f"runtime_grid needs a 2-D weight, bits in {WEIGHT_BITS} and block_size in "
            f"{BLOCK_SIZES}; got shape {tuple(weight.shape)}, bits={bits}, "
            f"block_size={block_size}"
        )
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits)
    rows, columns = weight.shape
    matrix = np.ascontiguousarray(weight.detach().float().cpu().numpy().T)  # the K x N layout
    codes, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(matrix)
    if bits == 4:  # two codes a byte, the first in the low nibble
        codes = np.stack([codes & 0x0F, codes >> 4], axis=-1)
    values = codes.reshape(rows, len(scales[0]), block_size).astype(np.float32) - 2 ** (bits - 1)
    values = (values * scales[..., None]).reshape(rows, -1)[:, :columns]
    return torch.from_numpy(np.ascontiguousarray(values)).to(weight.dtype)


def output_layer(model: nn.Module) -> nn.Module | None:
    """The causal LM's output layer (``lm_head``: Hugging Face's ``get_output_embeddings()``,
    through a peft wrapper too), or ``None`` for a model without one."""
    find = getattr(model, "get_output_embeddings", None)
    return find() if callable(find) else None


def input_embedding(model: nn.Module) -> nn.Module | None:
    """The model's input token embedding (Hugging Face's ``get_input_embeddings()``), or
    ``None`` for a model without one."""
    find = getattr(model, "get_input_embeddings", None)
    return find() if callable(find) else None


def output_tied(model: nn.Module) -> bool:
    """Whether ``model``'s output layer and input embedding share one weight (a tied table)."""
    head, embedding = output_layer(model), input_embedding(model)
    return head is not None and embedding is not None and head.weight is embedding.weight


def untie_output_layer(model: nn.Module) -> bool:
    """Give ``model``'s output layer its own copy of the token table it shares with the input
    embedding (and set ``config.tie_word_embeddings = False``, so that saving and loading keep
    them apart): the two can then sit on different grids (an int4 table, an int8 head). Returns
    whether they were tied.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True)
        >>> model = LlamaForCausalLM(config)
        >>> untie_output_layer(model), model.lm_head.weight is model.model.embed_tokens.weight
        (True, False)
    """
    if not output_tied(model):
        return False
    head, table = output_layer(model), input_embedding(model)
    head.weight = nn.Parameter(table.weight.detach().clone(), table.weight.requires_grad)
    model.config.tie_word_embeddings = False
    return True


def round_to_runtime_grid(
    model: nn.Module, bits: int = 4, block_size: int = 32, embedding_bits: int | None = None
) -> list[str]:
    """Round, in place, the weight of every ``nn.Linear`` of ``model`` but LoRA adapters (a
    tied output layer rounds the input embedding with it) to :func:`runtime_grid`: what ONNX
    Runtime GenAI's builder quantizes at ``weight_bits=bits``; the token table at
    ``embedding_bits`` when given (:func:`export_generator`'s ``embedding_bits``): the output
    layer when tied to it, else the input embedding (an untied output layer is a projection
    like the others, at ``bits``). Returns the names of the rounded layers.

    Example:
        >>> layer = torch.nn.Sequential(torch.nn.Linear(32, 2))
        >>> round_to_runtime_grid(layer)
        ['0']
    """
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".lora_" not in f".{name}"
    ]
    head, embedding, tied = output_layer(model), input_embedding(model), output_tied(model)
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            grid = embedding_bits if tied and layer is head and embedding_bits else bits
            layer.weight.copy_(runtime_grid(layer.weight, grid, block_size))
        if embedding_bits and embedding is not None and not tied:
            embedding.weight.copy_(runtime_grid(embedding.weight, embedding_bits, block_size))
            names.append(next(n for n, m in model.named_modules() if m is embedding))
    return names


def block_product_names(model: nn.Module) -> list[str]:
    """The builder's names of the linear products of ``model``'s decoder blocks
    (``/model/layers.{i}/attn/q_proj/MatMul``, ``/model/layers.{i}/mlp/down_proj/MatMul``, ...):
    every weight but the token table and the adapters; empty for a model without decoder-block
    projections the builder knows (``layers.N.self_attn`` / ``layers.N.mlp``)."""
    names = []
    for name, module in model.named_modules():
        found = re.search(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)$", name)
        if found is None or ".lora_" in name or not hasattr(module, "weight"):
            continue
        block, part, projection = found.groups()
        part = "attn" if part == "self_attn" else part
        names.append(f"/model/layers.{block}/{part}/{projection}/MatMul")
    return names


def folder_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of every file under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def export_generator(
    model: nn.Module,
    tokenizer: Any,
    output: str | os.PathLike[str],
    weight_bits: int | None = 4,
    block_size: int = 32,
    lora: str = "merge",
    embedding_bits: int | None = None,
) -> GeneratorExport:
    """Write ``model`` (a causal LM: LoRA-wrapped, masked or QAT-converted) as an ONNX Runtime
    GenAI folder at ``output`` with ``weight_bits`` integer weights.

    A block of ``block_size`` weights ``w`` is stored symmetrically (the builder's default) as
    ``round(w / s)`` with one scale ``s`` per block; the product de-quantizes on the fly
    (:func:`runtime_grid`).

    ``lora``: ``"merge"`` folds each adapter into its base weight, ``W + (alpha / r) B A``, which
    is then rounded; ``"separate"`` keeps every adapter as a float branch beside the integer
    base, ``q(W) x + (alpha / r) B A x`` (the builder's adapter path, the adapter products left
    unquantized): the deployment of a base trained on the runtime's grid
    (``LoRASettings(base_quantization="int4")``), where rounding the merged sum would erase
    every update smaller than half a grid step.

    ``weight_bits=8`` with a tied token table (the output layer sharing the input embedding's
    weight) stores the table once, in int8 blocks: the output layer's ``MatMulNBits`` and the
    input's ``GatherBlockQuantized`` read the same initializers (on SmolLM2-135M 3.3x smaller
    than fp32 with the adapters beside it). An untied input embedding stays fp32 at 8 bits
    (the builder writes no int8 ``Gather`` of its own).
    ``embedding_bits=4`` with ``weight_bits=8`` stores the token table (the input embedding,
    and the output layer when they are tied) in int4 blocks and every projection of the
    decoder blocks in int8: on SmolLM2-135M the table is a fifth of the weights, so this is
    about 3.6x smaller than fp32. An untied output layer (:func:`untie_output_layer`) is stored
    in int8 with the blocks: the answers are scored at the finer grid, for about 28 MB more on
    SmolLM2 (3.1x smaller than fp32). The base of ``LoRASettings(base_quantization="int8")``
    (with ``base_embedding_bits=4``: the int4 table; with ``untie_output=True`` too: the untied
    form) is on exactly these grids.

    Raises:
        ValueError: bad ``weight_bits``/``block_size``/``lora``/``embedding_bits``;
            ``lora="separate"`` for a model without LoRA adapters or with adapters outside the
            decoder blocks; an architecture the builder does not know (named in the message).
        FileExistsError: ``output`` exists and is not empty.
        RuntimeError: the builder failed (its last output lines are in the message).
    """
    from lightning_3d.export import dense_float_model, prepare_output_dir

    check_generator_arguments(weight_bits, block_size, embedding_bits)
    if lora not in LORA_DEPLOYMENTS:
        raise ValueError(f"lora must be one of {LORA_DEPLOYMENTS}, got {lora!r}")
    excluded = adapter_product_names(model) if lora == "separate" else []
    table_below = embedding_bits is not None and embedding_bits != weight_bits
    blocks, tied = block_product_names(model), output_tied(model)
    if table_below and not blocks:
        raise ValueError(
            "embedding_bits below weight_bits keeps the decoder blocks' projections at "
            "weight_bits, and this model has none the builder knows (layers.N.self_attn/mlp)"
        )
    # a tied table stored once in int8 needs the same by-name route (else: an fp32 embedding)
    shared_int8 = weight_bits == 8 and not table_below and tied and bool(blocks)
    mixed = table_below or shared_int8  # the int4 body, products raised to int8 by name
    upgraded = blocks if mixed else []
    if shared_int8 or (table_below and output_layer(model) is not None and not tied):
        upgraded.append("/lm_head/MatMul")  # the shared int8 table, or an untied head
    target = prepare_output_dir(output)
    precision = "fp32" if weight_bits is None else f"int{weight_bits}"
    if mixed:
        precision = "int4"
    with tempfile.TemporaryDirectory(prefix="lightning3d-genai-") as scratch:
        source, options = Path(scratch) / "hf", []
        if lora == "separate":  # the adapters on their own; the base without them
            with_adapters = copy.deepcopy(model)
            with_adapters.save_pretrained(Path(scratch) / "adapter")
            model = with_adapters.unload()
            options.append(f"adapter_path={Path(scratch) / 'adapter'}")
            if weight_bits is not None and not mixed:
                options.append("nodes_to_exclude=" + ",".join(excluded))
        dense, _, notes = dense_float_model(model)
        for note in notes:
            log.info("export_generator: %s", note)
        dense.save_pretrained(source)
        tokenizer.save_pretrained(source)
        command = [
            sys.executable, "-m", "onnxruntime_genai.models.builder",
            "-i", str(source), "-o", str(target), "-p", precision, "-e", "cpu",
            "-c", str(Path(scratch) / "cache"),
        ]  # fmt: skip
        if weight_bits is not None:
            options += [f"block_size={block_size}", "accuracy_level=4"]
        if mixed:  # the token table's Gather quantized too (tied: the one table)
            options.append("op_types_to_quantize=MatMul/Gather")
        if options:
            command += ["--extra_options", *options]
        if mixed:  # exact-name overrides: the structured form of the builder's options
            overrides = [{"match": {"name": n}, "type": f"int{weight_bits}"} for n in upgraded]
            overrides += [{"match": {"name": n}, "exclude": True} for n in excluded]
            weights = {"overrides": overrides}
            command += ["--target_options", json.dumps({"quant_config": {"weights": weights}})]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (target / "genai_config.json").exists():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        if "is not currently supported" in tail:
            architecture = (getattr(dense.config, "architectures", None) or ["?"])[0]
            raise ValueError(f"ONNX Runtime GenAI has no builder for {architecture}:\n{tail}")
        raise RuntimeError(f"the ONNX Runtime GenAI builder failed ({precision}):\n{tail}")
    if shared_int8:
        link_shared_table(target / "model.onnx")
    built = GeneratorExport(target, weight_bits, folder_bytes(target))
    log.info("export_generator: %s (%s) %.1f MB", target, precision, built.bytes / 2**20)
    return built


def link_shared_table(path: Path) -> None:
    """Point the token table's ``GatherBlockQuantized`` of the ONNX graph at ``path`` at the
    initializers of the output layer's ``MatMulNBits`` when it names ones the graph lacks.

    ONNX Runtime GenAI's builder (0.18) shares a tied table quantized to 8 bits between the two
    nodes but names the gather's inputs after another quantizer's convention
    (``lm_head.MatMul.weight_Q8G32``, ``..._scale``) while the product stores
    ``lm_head.MatMul.weight_Q8`` and ``..._scales``: the graph does not load. Both hold
    ``[vocabulary, blocks, block]`` codes with the implicit zero point ``2^(bits - 1)`` and
    ``[vocabulary, blocks]`` scales, so relinking the names is the whole repair; names that
    resolve are left alone. :func:`export_generator` calls it on every shared int8 table.

    Raises:
        RuntimeError: the graph has no ``GatherBlockQuantized`` beside an ``lm_head``
            ``MatMulNBits``, or a gather input still resolves to nothing after relinking.

    Example:
        >>> link_shared_table(Path("deploy/genai-int8/model.onnx"))  # doctest: +SKIP
    """
    import onnx

    graph_model = onnx.load(str(path), load_external_data=False)
    graph = graph_model.graph
    known = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    known |= {output for node in graph.node for output in node.output}
    head = next((n for n in graph.node if n.name.startswith("/lm_head/MatMul")), None)
    gather = next((n for n in graph.node if n.op_type == "GatherBlockQuantized"), None)
    if head is None or gather is None or head.op_type != "MatMulNBits":
        raise RuntimeError(
            f"{path}: no GatherBlockQuantized beside an lm_head MatMulNBits; the builder's "
            "shared 8-bit table changed (export with embedding_bits=4 instead)"
        )
    reshape = next((n for n in graph.node if gather.input[0] in n.output), None)
    codes = reshape.input if reshape is not None and reshape.op_type == "Reshape" else gather.input
    repairs = [(codes, 0, head.input[1]), (gather.input, 2, head.input[2])]
    for inputs, position, name in repairs:
        if inputs[position] not in known:
            inputs[position] = name
    missing = [name for name in [*codes, *gather.input] if name and name not in known]
    if missing:
        raise RuntimeError(f"{path}: the shared token table reads {missing}, which no node makes")
    onnx.save(graph_model, str(path))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def answer_log_probs_generated(
    generator: Any, prompt: Sequence[int], answers: Sequence[Sequence[int]]
) -> list[float]:
    """``log p(answer | prompt)`` of each answer in an empty ONNX Runtime GenAI ``generator``:
    the prompt is prefilled once, each answer appended and rewound to the prompt (its KV cache
    kept); the generator is left empty again.
    ``log p(a_1..a_k | x) = sum_j log softmax(logits(x, a_<j))[a_j]``."""
    generator.append_tokens(list(prompt))
    after_prompt = _log_softmax(np.asarray(generator.get_logits(), dtype=np.float64).reshape(-1))
    scores = []
    for answer in answers:
        total, log_probs = 0.0, after_prompt
        for position, token in enumerate(answer):
            total += float(log_probs[token])
            if position + 1 < len(answer):
                generator.append_tokens([int(token)])
                logits = np.asarray(generator.get_logits(), dtype=np.float64).reshape(-1)
                log_probs = _log_softmax(logits)
        if len(answer) > 1:
            generator.rewind_to(len(prompt))
        scores.append(total)
    generator.rewind_to(0)
    return scores


def answer_accuracy(
    path: str | os.PathLike[str],
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    labels: Sequence[int],
) -> float:
    """Share of ``prompts`` (token ids, without the answer) whose answer of highest
    log-probability under the GenAI model at ``path`` is ``answers[label]``.

    Raises:
        ValueError: ``prompts`` and ``labels`` differ in length, or there are none.
    """
    import onnxruntime_genai as og

    if len(prompts) != len(labels) or not prompts:
        raise ValueError(f"{len(prompts)} prompts and {len(labels)} labels: need as many, > 0")
    model = og.Model(str(path))
    answers = [[int(token) for token in answer] for answer in answers]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max(map(len, prompts)) + max(map(len, answers)) + 1)
    generator = og.Generator(model, params)  # one KV cache, rewound between prompts
    correct = 0
    for prompt, label in zip(prompts, labels, strict=True):
        scores = answer_log_probs_generated(generator, [int(t) for t in prompt], answers)
        correct += int(np.argmax(scores) == label)
    return correct / len(prompts)


def tokens_per_second(
    path: str | os.PathLike[str],
    prompt: Sequence[int],
    new_tokens: int = NEW_TOKENS,
    rounds: int = 3,
) -> float:
    """Median over ``rounds`` of greedy decoding speed at batch 1: ``new_tokens`` generated after
    ``prompt`` (the prefill is not counted), one warm-up round first."""
    import onnxruntime_genai as og

    model = og.Model(str(path))

    def one_round(count: int) -> float:
        params = og.GeneratorParams(model)
        length = len(prompt) + count
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(list(prompt))
        started, made = time.perf_counter(), 0
        while not generator.is_done():
            generator.generate_next_token()
            made += 1
        return made / (time.perf_counter() - started)

    one_round(min(8, new_tokens))
    return statistics.median(one_round(new_tokens) for _ in range(rounds))


@dataclass(frozen=True)
class GeneratorReport:
    """One exported generator as measured: folder bytes, accuracy on the prompts (``None``
    without them) and greedy tokens per second at batch 1 (``None`` with no timing rounds)."""

    format: str
    path: str
    bytes: int
    accuracy: float | None
    tokens_per_s: float | None


def export_generators(
    model: nn.Module,
    tokenizer: Any,
    output: str | os.PathLike[str],
    formats: Sequence[str],
    prompts: Sequence[Sequence[int]] | None = None,
    answers: Sequence[Sequence[int]] | None = None,
    labels: Sequence[int] | None = None,
    rounds: int = 3,
    new_tokens: int = NEW_TOKENS,
    overwrite: bool = False,
    lora: str = "merge",
    embedding_bits: int | None = None,
) -> list[GeneratorReport]:
    """Each of ``formats`` (:data:`GENERATOR_FORMATS`) written to ``output/<format>`` by
    :func:`export_generator`, scored on ``prompts`` (:func:`answer_accuracy`, when given) and
    timed (:func:`tokens_per_second` over ``rounds``, after the first prompt or the tokenizer's
    BOS); the list is also saved as ``output/generation_report.json``. ``overwrite`` replaces
    those format folders when they exist; ``lora`` is :func:`export_generator`'s, and so is
    ``embedding_bits``, for ``genai-int8`` (4: the token table in int4 blocks).

    Raises:
        ValueError: an unknown format (the message lists them), prompts without answers and
            labels.
    """
    unknown = [f for f in formats if f not in GENERATOR_FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats {unknown or []}: choose from {list(GENERATOR_FORMATS)}")
    if prompts is not None and (answers is None or labels is None):
        raise ValueError("scoring prompts needs their answers and labels")
    start = [int(t) for t in prompts[0]] if prompts else [int(tokenizer.bos_token_id or 0)]
    reports = []
    for name in formats:
        folder = Path(output) / name
        if overwrite and folder.is_dir():
            shutil.rmtree(folder)
        bits = GENERATOR_FORMATS[name]
        table = embedding_bits if bits == 8 else None
        built = export_generator(model, tokenizer, folder, bits, lora=lora, embedding_bits=table)
        accuracy = None
        if prompts is not None:
            assert answers is not None and labels is not None
            accuracy = answer_accuracy(built.path, prompts, answers, labels)
        speed = tokens_per_second(built.path, start, new_tokens, rounds) if rounds else None
        reports.append(GeneratorReport(name, str(built.path), built.bytes, accuracy, speed))
    document = [asdict(report) for report in reports]
    (Path(output) / GENERATOR_REPORT_FILE).write_text(json.dumps(document, indent=1))
    return reports


def generator_table(reports: Sequence[GeneratorReport]) -> str:
    """A Markdown table of :func:`export_generators`' reports."""
    lines = ["| format | MiB | accuracy % | tokens/s |", "|---|---|---|---|"]
    for r in reports:
        accuracy = "-" if r.accuracy is None else f"{100 * r.accuracy:.2f}"
        speed = "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.1f}"
        lines.append(f"| {r.format} | {r.bytes / 2**20:.1f} | {accuracy} | {speed} |")
    return "\n".join(lines)
