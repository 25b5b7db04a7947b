"""Default experiment tracking: Weights & Biases (online when credentials exist) plus CSV.

W&B needs an API key to upload. Without one (no ``WANDB_API_KEY``, no ``wandb login`` entry in
``~/.netrc``, no ``WANDB_MODE`` chosen by the user), :class:`WandbLogger` runs offline: the run
is written under ``<save_dir>/wandb/offline-run-*`` and can be uploaded later with
``wandb sync <that folder>``. This is said once in the log.

Example:
    >>> from lightning import Trainer
    >>> trainer = Trainer(logger=default_loggers("runs"))  # doctest: +SKIP
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info

WANDB_HOST = "api.wandb.ai"


def wandb_credentials_available() -> bool:
    """True when W&B can authenticate: ``WANDB_API_KEY`` is set or ``~/.netrc`` has a W&B entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(netrc_path).authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError, PermissionError):
        return False


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` that goes offline by itself when there are no credentials.

    Args:
        offline: ``True``/``False`` force the mode; ``None`` (default) picks offline exactly when
            :func:`wandb_credentials_available` is false and ``WANDB_MODE`` is unset.
        project: W&B project name.
        **kwargs: everything Lightning's ``WandbLogger`` accepts (``name``, ``save_dir``, ``tags``,
            ``log_model``, ...).
    """

    def __init__(
        self, offline: bool | None = None, project: str = "lightning-3d", **kwargs: Any
    ) -> None:
        if offline is None:
            offline = not wandb_credentials_available() and "WANDB_MODE" not in os.environ
            if offline:
                save_dir = kwargs.get("save_dir") or "."
                rank_zero_info(
                    "W&B: no credentials found (set WANDB_API_KEY or run `wandb login`); logging "
                    f"offline under {Path(save_dir) / 'wandb'}. Upload later with `wandb sync`."
                )
        super().__init__(offline=offline, project=project, **kwargs)


def default_loggers(
    save_dir: str | os.PathLike[str], project: str = "lightning-3d"
) -> list[Logger]:
    """W&B (offline without credentials) and a CSV logger, both writing under ``save_dir``.

    CSV metrics land in ``<save_dir>/csv/version_<n>/metrics.csv``.
    """
    save_dir = os.fspath(save_dir)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return [WandbLogger(project=project, save_dir=save_dir), CSVLogger(save_dir, name="csv")]


def log_histogram(trainer: Any, tag: str, values: Any) -> None:
    """Log a histogram of ``values`` (array-like) under ``tag`` at the trainer's global step to
    every W&B and TensorBoard logger of ``trainer`` (others cannot hold one); rank 0 only."""
    if not trainer.is_global_zero:
        return
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.loggers import WandbLogger as AnyWandbLogger

    step = trainer.global_step
    for logger in trainer.loggers:
        if isinstance(logger, AnyWandbLogger):
            import wandb

            logger.experiment.log({tag: wandb.Histogram(values), "trainer/global_step": step})
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_histogram(tag, values, step)


def log_table_and_figure(
    trainer: Any,
    table_tag: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    figure_tag: str,
    make_figure: Callable[[], Any],
) -> None:
    """Log a table (W&B) and a matplotlib figure (W&B and TensorBoard) at the trainer's global
    step, on rank 0; ``make_figure`` runs only when some logger can show the figure."""
    if not trainer.is_global_zero:
        return
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.loggers import WandbLogger as AnyWandbLogger

    figure = None
    step = trainer.global_step
    for logger in trainer.loggers:
        if isinstance(logger, AnyWandbLogger):
            import wandb

            figure = figure or make_figure()
            table = wandb.Table(columns=list(columns), data=[list(row) for row in rows])
            logger.experiment.log(
                {table_tag: table, figure_tag: wandb.Image(figure), "trainer/global_step": step}
            )
        elif isinstance(logger, TensorBoardLogger):
            figure = figure or make_figure()
            logger.experiment.add_figure(figure_tag, figure, step)


def log_axis_metrics(trainer: Any, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Report an axis's figures where users look for them: ``trainer.callback_metrics`` (so
    ``EarlyStopping``, ``ModelCheckpoint`` and the progress bar can use them, also without a
    logger) and every logger of ``trainer``, at ``step`` (default: the global step).

    Lightning's loggers write on rank 0 only; every rank updates its own ``callback_metrics``.

    Example:
        >>> log_axis_metrics(trainer, {"pruner/sparsity": 0.5})  # doctest: +SKIP
    """
    import torch

    trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})
    at = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=at)
