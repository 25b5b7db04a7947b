"""The model of the distributed jobs, shared with the tests that load what the jobs saved."""

from __future__ import annotations

from typing import Any

#: all-MiniLM-L6-v2 cut to its first 2 of 6 transformer blocks: the jobs' collectives, sharding
#: units and callbacks treat every block alike, and 2 blocks train in a third of the time.
BLOCKS = 2


def job_minilm(**task_kwargs: Any) -> Any:
    """A ``SequenceClassificationTask`` on the real MiniLM: its embeddings, its first
    :data:`BLOCKS` blocks and a new head."""
    from lightning_3d.tasks import SequenceClassificationTask

    task = SequenceClassificationTask(**task_kwargs)
    encoder = task.model.bert.encoder
    encoder.layer = encoder.layer[:BLOCKS]
    task.model.config.num_hidden_layers = BLOCKS
    return task
