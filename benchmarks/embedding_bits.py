"""The token-embedding table of an int8 export at 8 or 4 bits, measured on one trained graph.

``lightning-3d export --embedding_bits 4`` (``ThreeDPlan(embedding_bits=4)``) stores the token
table, half of all-MiniLM-L6-v2's parameters, in 4-bit blocks of 32 entries with one scale each
(:func:`lightning_3d.export.quantize_embedding_4bit`) instead of ONNX Runtime's int8 with one
scale for the table. This script takes the fp32 ONNX graph of a finished run
(``benchmarks/ablation.py`` keeps the seed-0 exports), quantizes it both ways with the default
int8 scheme and scores the fp32 graph and both int8 graphs on the whole test split, side by
side: bytes, accuracy, and agreement with the fp32 graph's predictions.

Usage::

    python benchmarks/embedding_bits.py --export /tmp/ablation-exports/Standard-half-seed0 \\
        --machine cpu-2c-xeon --results-dir benchmarks/results/ablation/cpu-2c-xeon-held
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from ablation import export_arguments, git_commit


def main() -> None:
    from lightning_3d.data import RottenTomatoes
    from lightning_3d.export import (
        EMBEDDING_BITS,
        batches_of,
        evaluate,
        onnx_runner,
        quantize_onnx_int8,
    )
    from lightning_3d.models import load_tokenizer, resolve_classifier

    args = export_arguments(__doc__.split("\n\n")[0], "a run's export folder")

    graph = args.export / "onnx" / "model.onnx"
    if not graph.exists():
        raise SystemExit(f"{graph} does not exist: the run's fp32 ONNX graph is needed")
    data = RottenTomatoes(
        tokenizer=load_tokenizer(resolve_classifier(None)), max_length=args.max_length
    )
    data.setup("test")
    batches = batches_of(data.test_dataloader())
    fp32 = evaluate(onnx_runner(graph), batches)
    document = {
        "export": graph.parent.parent.name,
        "machine": args.machine,
        "commit": git_commit(),
        "test_rows": sum(len(ids) for ids, _, _ in batches),
        "fp32": {"bytes": graph.stat().st_size, "acc": 100 * fp32["accuracy"]},
    }
    scratch = Path(tempfile.mkdtemp())
    try:
        for bits in EMBEDDING_BITS:
            target = scratch / f"int8-table{bits}.onnx"
            quantize_onnx_int8(graph, target, embedding_bits=bits)
            measured = evaluate(onnx_runner(target), batches, fp32["logits"])
            document[f"int8_table{bits}"] = {
                "bytes": target.stat().st_size,
                "acc": 100 * measured["accuracy"],
                "agreement": measured["agreement"],
            }
    finally:
        shutil.rmtree(scratch)
    print(json.dumps(document, indent=1))
    name = f"embedding_bits_{document['export']}_{args.machine}.json"
    (args.results_dir / name).write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
