"""What a trimmed vocabulary's unseen ids should read: the unknown token's row or the nearest
kept row, measured on the same trained model.

Vocabulary trimming (:class:`~lightning_3d.callbacks.VocabularyTrimmer`) keeps the embedding
rows of the tokens in the training split. Training never reads the others, so the trained
weights do not depend on what an id that was not kept reads; only inference does. This script
takes the deployed ONNX graph of a trimmed run (``benchmarks/ablation.py`` keeps the seed-0
exports), swaps the table of rows it holds (``TrimmedEmbedding.token_rows``, one int64 entry
per tokenizer id) between the two policies of ``VocabularyTrimmer(unseen=...)``:

* ``unknown``: every id not kept reads the unknown token's row (what the graph holds);
* ``nearest``: it reads the row of the kept id nearest to its own pretrained row (cosine,
  :func:`lightning_3d.vocabulary.nearest_kept` on the packaged all-MiniLM-L6-v2 embedding,
  which is what the trimmer sees before training),

and scores both on the whole test split side by side, with the share of test tokens and reviews
that hold an id the training split never had.

Usage::

    python benchmarks/vocabulary.py --export benchmarks/results/exported/ablation/3D-seed0 \\
        --machine cpu-2c-xeon --results-dir benchmarks/results/ablation/cpu-2c-xeon
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from ablation import export_arguments, git_commit

FORMATS = ("onnx-int8", "onnx")  # the deployed graph of a run, int8 first


def main() -> None:
    import onnx
    import torch
    from onnx import numpy_helper

    from lightning_3d.data import RottenTomatoes
    from lightning_3d.export import batches_of, evaluate, onnx_runner
    from lightning_3d.tasks import SequenceClassificationTask
    from lightning_3d.vocabulary import nearest_kept, row_table

    args = export_arguments(__doc__.split("\n\n")[0], "a trimmed run's export")

    graph = next(args.export / f / "model.onnx" for f in FORMATS if (args.export / f).exists())
    task = SequenceClassificationTask()
    embedding = task.model.get_input_embeddings().weight
    vocabulary, unknown = embedding.shape[0], int(task.tokenizer.unk_token_id)
    model = onnx.load(str(graph))
    tables = [
        t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT64
        and list(t.dims) == [vocabulary]
    ]  # fmt: skip
    if len(tables) != 1:
        raise SystemExit(f"{graph}: expected one int64 table of {vocabulary} rows")
    table = numpy_helper.to_array(tables[0])
    kept = np.flatnonzero(table != table[unknown])
    kept = torch.as_tensor(np.union1d(kept, [unknown]))
    nearest = row_table(kept, vocabulary, unknown, nearest_kept(embedding, kept))
    tables[0].CopyFrom(numpy_helper.from_array(nearest.numpy(), tables[0].name))

    data = RottenTomatoes(tokenizer=task.tokenizer, max_length=args.max_length)
    data.setup("test")
    batches = batches_of(data.test_dataloader())
    known = np.zeros(vocabulary, dtype=bool)
    known[kept.numpy()] = True
    tokens = np.concatenate([ids[mask.astype(bool)] for ids, mask, _ in batches])
    reviews = sum(
        int((~known[ids] & mask.astype(bool)).any(axis=1).sum()) for ids, mask, _ in batches
    )
    scratch = Path(tempfile.mkdtemp())
    try:
        swapped = scratch / "model.onnx"
        onnx.save(model, str(swapped))
        unknown_run = evaluate(onnx_runner(graph), batches)
        nearest_run = evaluate(onnx_runner(swapped), batches, unknown_run["logits"])
    finally:
        shutil.rmtree(scratch)
    document = {
        "export": str(graph.relative_to(args.export.parent)),
        "machine": args.machine,
        "commit": git_commit(),
        "kept_ids": len(kept),
        "vocabulary": vocabulary,
        "test_tokens_unseen": float((~known[tokens]).mean()),
        "test_reviews_with_unseen": reviews / sum(len(ids) for ids, _, _ in batches),
        "acc_unknown": 100 * unknown_run["accuracy"],
        "acc_nearest": 100 * nearest_run["accuracy"],
        "agreement": nearest_run["agreement"],
    }
    print(json.dumps(document, indent=1))
    name = f"vocabulary_unseen_{args.export.name}_{args.machine}.json"
    (args.results_dir / name).write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
