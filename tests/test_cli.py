"""The `lightning-3d` command: a real, offline fit through LightningCLI with W&B and CSV logs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_3d.loggers import default_loggers, wandb_credentials_available

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "examples" / "configs" / "rt_minilm_baseline.yaml"
LM_CONFIG = REPO / "examples" / "configs" / "hamlet_smollm2_lora.yaml"
PROMPT_CONFIG = REPO / "examples" / "configs" / "rt_smollm2_lora.yaml"
PROMPT_PLAN_CONFIG = REPO / "examples" / "configs" / "rt_smollm2_3d.yaml"
ONE_EPOCH_LM_PLAN = REPO / "examples" / "configs" / "rt_smollm2_3d_one_epoch.yaml"
INT8_LM_PLAN = REPO / "examples" / "configs" / "rt_smollm2_3d_int8.yaml"
FSDP_CONFIG = REPO / "examples" / "configs" / "rt_minilm_fsdp_compressed.yaml"
CURRICULUM_CONFIG = REPO / "examples" / "configs" / "rt_minilm_curriculum.yaml"
FREEZER_CONFIG = REPO / "examples" / "configs" / "rt_minilm_freezer.yaml"
PRUNER_CONFIG = REPO / "examples" / "configs" / "rt_minilm_pruner.yaml"
QAT_CONFIG = REPO / "examples" / "configs" / "rt_minilm_pruner_qat.yaml"
PLAN_CONFIG = REPO / "examples" / "configs" / "rt_minilm_3d.yaml"
BUDGET_CONFIG = REPO / "examples" / "configs" / "rt_minilm_budget.yaml"
STRUCTURED_CONFIG = REPO / "examples" / "configs" / "rt_minilm_structured.yaml"
STRUCTURED_QAT_CONFIG = REPO / "examples" / "configs" / "rt_minilm_structured_qat.yaml"
# 4 steps of 4 reviews of up to 32 tokens, one validation and one test batch, every step logged
SHORT_RUN = (
    "--trainer.max_steps=4",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.log_every_n_steps=1",
    "--data.init_args.batch_size=4",
    "--data.init_args.max_length=32",
)


def _cli() -> list[str]:
    script = shutil.which("lightning-3d", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "lightning_3d.cli"]


def _offline_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        HOME=str(home),
        NETRC=str(home / ".netrc"),
        HF_HUB_OFFLINE="1",
        LIGHTNING_3D_CACHE=os.environ.get(
            "LIGHTNING_3D_CACHE", str(Path.home() / ".cache" / "lightning_3d")
        ),
    )
    return env


def _fit(tmp_path: Path, config: Path, *overrides: str) -> tuple[Path, str]:
    """``lightning-3d fit --config CONFIG`` into ``tmp_path/run`` with ``overrides``, offline;
    returns the run folder and the output, after checking that the command succeeded."""
    root = tmp_path / "run"
    args = [*_cli(), "fit", "--config", str(config), "--trainer.default_root_dir", str(root)]
    result = subprocess.run(
        [*args, *overrides],
        env=_offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return root, output


def _csv_rows(root: Path) -> list[dict[str, str]]:
    with open(next(root.glob("csv/version_*/metrics.csv"))) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow  # the strategy is tested in test_strategies; this is the CLI wiring
def test_cli_fits_with_the_compressed_fsdp_strategy_on_two_processes(tmp_path) -> None:
    root = tmp_path / "run"
    args = [
        *_cli(),
        "fit",
        "--config",
        str(FSDP_CONFIG),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(root),
        "--test_after_fit",
        "false",
        "--data.init_args.batch_size",
        "4",
    ]
    env = {**_offline_env(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    with open(next(root.glob("lightning_logs/version_*/metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    ratios = [float(r["comm/compression_ratio"]) for r in rows if r.get("comm/compression_ratio")]
    assert len(ratios) == 2 and min(ratios) >= 12
    # the best checkpoint is a sharded folder with both ranks' residuals
    (checkpoint,) = root.rglob("best-*.ckpt")
    assert sorted(f.name for f in checkpoint.glob("compression_state.rank*.pt")) == [
        "compression_state.rank0.pt",
        "compression_state.rank1.pt",
    ]


def test_cli_fits_offline_with_the_curriculum_config_and_logs_to_wandb_and_csv(tmp_path) -> None:
    """A whole ``lightning-3d fit`` without W&B credentials: an offline W&B run and CSV metrics
    (training loss, validation and the test after fit), the saved config and the best
    checkpoint; and the data axis's own metrics."""
    root, output = _fit(
        tmp_path,
        CURRICULUM_CONFIG,
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.limit_test_batches",
        "1",
        "--trainer.log_every_n_steps",
        "1",
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.max_length",
        "32",
    )
    assert output.count("W&B: no credentials found") == 1
    runs = list((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    rows = _csv_rows(root)
    train_losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(train_losses) == 6 and all(0 < loss < 5 for loss in train_losses)
    assert any(r.get("val/acc") for r in rows)
    test_acc = [float(r["test/acc"]) for r in rows if r.get("test/acc")]  # test_after_fit: true
    assert len(test_acc) == 1 and 0 <= test_acc[0] <= 1
    assert (root / "config.yaml").exists()
    assert list(root.rglob("best-*.ckpt"))
    fractions = [
        float(r["curriculum/fraction_in_play"])
        for r in rows
        if r.get("curriculum/fraction_in_play")
    ]
    # epoch 0: all of the data; epoch 1: the budget's half, paced to half of it
    assert fractions[0] == 1.0 and fractions[1] == pytest.approx(0.25, abs=1e-3)
    seen = [float(r["curriculum/samples_seen"]) for r in rows if r.get("curriculum/samples_seen")]
    assert seen == [4.0 * step for step in range(1, 7)]  # 3 batches of 4 per epoch
    wandb_run = next((root / "wandb").glob("offline-run-*/run-*.wandb"))
    assert b"curriculum/scores" in wandb_run.read_bytes()  # the score histogram reached W&B
    quantiles = [r for r in rows if r.get("curriculum/score_q50")]
    assert quantiles and all(
        float(r["curriculum/score_q10"])
        <= float(r["curriculum/score_q50"])
        <= float(r["curriculum/score_q90"])
        for r in quantiles
    )


def test_cli_help_lists_the_subcommands(capsys) -> None:
    from lightning_3d.cli import main

    with pytest.raises(SystemExit) as exited:  # in-process: the fit tests run the console script
        main(["--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    for subcommand in ("fit", "validate", "test", "predict", "export"):
        assert subcommand in shown


def test_every_example_config_is_tested() -> None:
    assert sorted((REPO / "examples" / "configs").glob("*.yaml")) == sorted(
        [
            BASELINE,
            LM_CONFIG,
            PROMPT_CONFIG,
            PROMPT_PLAN_CONFIG,
            ONE_EPOCH_LM_PLAN,
            INT8_LM_PLAN,
            FSDP_CONFIG,
            CURRICULUM_CONFIG,
            FREEZER_CONFIG,
            PRUNER_CONFIG,
            QAT_CONFIG,
            PLAN_CONFIG,
            BUDGET_CONFIG,
            STRUCTURED_CONFIG,
            STRUCTURED_QAT_CONFIG,
        ]
    )


EXAMPLE_CONFIGS = [
    BASELINE,
    LM_CONFIG,
    PROMPT_CONFIG,
    PROMPT_PLAN_CONFIG,
    ONE_EPOCH_LM_PLAN,
    INT8_LM_PLAN,
    FSDP_CONFIG,
    CURRICULUM_CONFIG,
    FREEZER_CONFIG,
    PLAN_CONFIG,
    BUDGET_CONFIG,
    STRUCTURED_CONFIG,
]
# Parses every config given on its command line in one process (the CLI's start-up, not the
# parsing, takes the time), printing a marker line before each.
PARSE_ALL = """
import sys
from lightning_3d.cli import main
for config in sys.argv[1:]:
    print("=== " + config, flush=True)
    try:
        main(["fit", "--config", config, "--print_config"])
    except SystemExit as stop:
        if stop.code:
            raise
"""


def test_example_configs_parse(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PARSE_ALL, *map(str, EXAMPLE_CONFIGS)],
        env=_offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout.split("=== ")[1:]
    assert len(printed) == len(EXAMPLE_CONFIGS)
    for config, text in zip(EXAMPLE_CONFIGS, printed, strict=True):
        assert text.startswith(str(config)) and "class_path: lightning_3d." in text, config


def test_bad_config_value_fails_before_training(tmp_path) -> None:
    from lightning_3d.cli import Lightning3DCLI

    args = ["--config", str(BASELINE), "--data.init_args.val_fraction", "1.5"]
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1\.5"):
        Lightning3DCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=[*args, "--trainer.default_root_dir", str(tmp_path)],
        )
    assert not list(tmp_path.iterdir())  # nothing was written


def test_wandb_credentials_detection(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert not wandb_credentials_available()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_credentials_available()
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_credentials_available()


def test_default_loggers_go_offline_without_credentials(tmp_path, monkeypatch) -> None:
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    wandb_logger, csv_logger = default_loggers(tmp_path / "logs")
    assert wandb_logger._offline is True
    assert wandb_logger.save_dir == str(tmp_path / "logs")
    assert Path(csv_logger.log_dir).parent.parent == tmp_path / "logs"


def test_cli_fits_with_the_freezer_config_and_logs_its_table_and_heatmap(tmp_path) -> None:
    config = yaml.safe_load(FREEZER_CONFIG.read_text())
    config["trainer"]["callbacks"][0]["init_args"]["warmup_steps"] = 2  # freeze after 2 steps
    (tmp_path / "freezer.yaml").write_text(yaml.safe_dump(config))
    root, _ = _fit(
        tmp_path,
        tmp_path / "freezer.yaml",
        *SHORT_RUN,
    )
    rows = _csv_rows(root)
    fractions = [
        float(r["freezer/trainable_fraction"]) for r in rows if r.get("freezer/trainable_fraction")
    ]
    assert fractions[0] == 1.0 and 0.05 < fractions[-1] <= 0.1  # frozen after 2 steps
    key = "freezer/optimizer_state_mb"
    states = [float(r[key]) for r in rows if r.get(key)]
    assert len(states) == 1 and states[0] < 0.11 * 173  # AdamW state of 10% of 22.7M parameters
    wandb_run = next((root / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"freezer/sensitivity" in wandb_run and b"freezer/heatmap" in wandb_run


@pytest.mark.slow  # the pruner's sparsity and histograms through the CLI: the prune+quantize run
def test_cli_fits_with_the_pruner_config_and_logs_sparsity_and_histograms(tmp_path) -> None:
    config = yaml.safe_load(PRUNER_CONFIG.read_text())
    config["trainer"]["callbacks"][0]["init_args"].update(start_step=1, end_step=3, frequency=1)
    (tmp_path / "pruner.yaml").write_text(yaml.safe_dump(config))
    root, _ = _fit(
        tmp_path,
        tmp_path / "pruner.yaml",
        *SHORT_RUN,
    )
    rows = _csv_rows(root)
    sparsity = [float(r["pruner/sparsity"]) for r in rows if r.get("pruner/sparsity")]
    assert sparsity[0] == 0.0 and sparsity[-1] == pytest.approx(0.5)
    assert float(
        [r for r in rows if r.get("pruner/sparsity_layer_5")][-1]["pruner/sparsity_layer_5"]
    ) == pytest.approx(0.5)
    wandb_run = next((root / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"pruner/kept_scores" in wandb_run


def test_cli_prunes_and_quantizes_in_one_run_and_tests_the_converted_model(tmp_path) -> None:
    config = yaml.safe_load(QAT_CONFIG.read_text())
    pruner, qat = (c["init_args"] for c in config["trainer"]["callbacks"][:2])
    pruner.update(start_step=0, end_step=2, frequency=1)
    qat.update(start_step=2, error_every=1)
    (tmp_path / "qat.yaml").write_text(yaml.safe_dump(config))
    root, _ = _fit(tmp_path, tmp_path / "qat.yaml", *SHORT_RUN)
    rows = _csv_rows(root)
    stages = [float(r["qat/stage"]) for r in rows if r.get("qat/stage")]
    assert stages == [0.0, 0.0, 1.0, 1.0]
    errors = [float(r["qat/weight_error"]) for r in rows if r.get("qat/weight_error")]
    assert errors and all(0.0 < e < 0.2 for e in errors)
    assert [r for r in rows if r.get("qat/weight_error/model.bert.embeddings.word_embeddings")]
    assert [r for r in rows if r.get("test/acc")]  # the best checkpoint, converted, was tested
    sparsity = [float(r["pruner/sparsity"]) for r in rows if r.get("pruner/sparsity")]
    assert sparsity == sorted(sparsity) and sparsity[-1] == pytest.approx(pruner["target_sparsity"])
    assert [r for r in rows if r.get("pruner/sparsity_layer_5")]
    wandb_run = next((root / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"pruner/kept_scores" in wandb_run and b"qat/weight_error" in wandb_run


@pytest.mark.slow  # export of pruned + quantized models: test_export; this is the CLI path
def test_cli_exports_a_pruned_and_quantized_run(tmp_path) -> None:
    """rt_minilm_structured_qat.yaml, shortened: heads and neurons pruned by step 2, QAT from
    step 2; its last checkpoint exported to every format from the same configuration."""
    from transformers import AutoModelForSequenceClassification

    from lightning_3d.quantization import load_quantized, quantized_modules

    config = yaml.safe_load(STRUCTURED_QAT_CONFIG.read_text())
    pruner, qat = (c["init_args"] for c in config["trainer"]["callbacks"][:2])
    pruner.update(start_step=0, end_step=2, frequency=1)
    qat.update(start_step=2)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    root, _ = _fit(tmp_path, tmp_path / "run.yaml", *SHORT_RUN)
    checkpoint = next(root.rglob("last.ckpt"))
    out = tmp_path / "deploy"
    args = [*_cli(), "export", "--config", str(tmp_path / "run.yaml"), *SHORT_RUN[-2:]]
    args += ["--ckpt_path", str(checkpoint), "--output", str(out), "--eval_samples", "32"]
    args += ["--formats", "hf", "onnx-int8", "torchao", "--latency_rounds", "0"]
    result = subprocess.run(
        args, env=_offline_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "| onnx-int8 |" in result.stdout

    report = json.loads((out / "report.json").read_text())
    assert [r["format"] for r in report["rows"]] == ["pytorch-fp32", "hf", "onnx-int8", "torchao"]
    assert report["evaluated_samples"] == 32
    # round(0.3 * 12) = 4 heads and round(0.3 * 1536) = 461 neurons went in every block
    assert report["structures"]["bert.encoder.layer.0.attention.self.heads"] == [8, 12]
    assert report["structures"]["bert.encoder.layer.3.neurons"] == [1075, 1536]
    rows = {r["format"]: r for r in report["rows"]}
    assert rows["torchao"]["agreement"] >= 0.95 and rows["hf"]["agreement"] == 1.0
    assert any("dequantized" in note for note in report["notes"])
    hf = AutoModelForSequenceClassification.from_pretrained(out / "hf")
    assert hf.config.intermediate_size == 1075
    assert quantized_modules(load_quantized(out / "torchao"))


@pytest.mark.slow  # SmolLM2 trained, exported by the GenAI builder and scored
def test_cli_exports_the_lora_plan_for_generation_with_adapters_beside_the_int4_base(
    tmp_path,
) -> None:
    """rt_smollm2_3d_one_epoch.yaml for 4 steps: its base trained on the runtime's int4 grid,
    exported as ``genai-int4`` with the adapters kept as float products (the run's
    ``LoRASettings.deployment``), scored on 8 test prompts and timed."""
    import onnx
    import torch

    from lightning_3d.generation import runtime_grid

    overrides = (*SHORT_RUN[:-1], "--plan.max_steps=4", "--data.init_args.train_samples=16")
    root, _ = _fit(tmp_path, ONE_EPOCH_LM_PLAN, *overrides, "--data.init_args.max_length=96")
    checkpoint = next(root.rglob("last.ckpt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    base = state["model.base_model.model.model.layers.3.mlp.up_proj.weight"]
    assert torch.equal(runtime_grid(base), base)  # trained on the grid
    out = tmp_path / "deploy"
    args = [*_cli(), "export", "--config", str(ONE_EPOCH_LM_PLAN), "--ckpt_path", str(checkpoint)]
    args += ["--output", str(out), "--formats", "genai-int4", "--eval_samples", "8"]
    args += ["--latency_rounds", "1"]
    result = subprocess.run(
        args, env=_offline_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "| genai-int4 |" in result.stdout
    (report,) = json.loads((out / "generation_report.json").read_text())
    assert report["format"] == "genai-int4" and 0.0 <= report["accuracy"] <= 1.0
    assert report["tokens_per_s"] > 0
    graph = onnx.load(str(out / "genai-int4" / "model.onnx"), load_external_data=False).graph
    ops = {node.name: node.op_type for node in graph.node}
    assert ops["/model/layers.29/attn/o_proj/lora_B/MatMul"] == "MatMul"  # float adapter
    assert sum(op == "MatMulNBits" for op in ops.values()) == 30 * 7 + 1  # base and head


@pytest.mark.slow  # SmolLM2 trained, exported by the GenAI builder and scored
def test_cli_exports_the_plan_merged_on_int8_with_one_shared_int8_table(tmp_path) -> None:
    """rt_smollm2_3d_int8.yaml for 4 steps (its batches grouped by length) trains on the float
    base; ``lightning-3d export --formats genai-int8`` merges the adapters into it and stores
    every block product, the head and the embedding that reads the head's table in int8: no
    float adapter is left beside the base."""
    import onnx
    import torch

    from lightning_3d.generation import runtime_grid

    overrides = (*SHORT_RUN[:-1], "--plan.max_steps=4", "--data.init_args.train_samples=32")
    root, _ = _fit(tmp_path, INT8_LM_PLAN, *overrides)
    checkpoint = next(root.rglob("last.ckpt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    block = state["model.base_model.model.model.layers.3.mlp.up_proj.weight"]
    assert not torch.equal(runtime_grid(block, 8), block)  # the float base, not rounded
    out = tmp_path / "deploy"
    args = [*_cli(), "export", "--config", str(INT8_LM_PLAN), "--ckpt_path", str(checkpoint)]
    args += ["--output", str(out), "--formats", "genai-int8"]
    args += ["--eval_samples", "8", "--latency_rounds", "0"]
    result = subprocess.run(
        args, env=_offline_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    graph = onnx.load(str(out / "genai-int8" / "model.onnx"), load_external_data=False).graph
    bits = {
        n.name: next(a.i for a in n.attribute if a.name == "bits")
        for n in graph.node
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
    }
    blocks = [b for name, b in bits.items() if name.startswith("/model/layers.")]
    assert blocks == [8] * (30 * 7)
    assert sorted(b for name, b in bits.items() if not name.startswith("/model/layers.")) == [8, 8]
    ops = {node.name: node.op_type for node in graph.node}
    assert ops["/model/embed_tokens/GatherBlockQuantized"] == "GatherBlockQuantized"
    assert not any("lora" in name for name in ops)  # merged into the int8 products


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (["--formats", "tflite"], ValueError, r"unknown \['tflite'\]"),
        (
            ["--formats", "hf", "genai-int3"],
            ValueError,
            r"unknown \['genai-int3'\]; .* for causal LMs also \('genai-fp32'",
        ),
        (["--formats", "torchao"], ValueError, r"'torchao'.*has none"),
        (["--int8_scheme", "int3"], ValueError, "choose from"),
    ],
)
def test_cli_export_refuses_bad_input_before_any_work(tmp_path, arguments, error, message) -> None:
    from lightning_3d.cli import main

    checkpoint = tmp_path / "empty.ckpt"
    checkpoint.write_bytes(b"")
    base = ["export", "--config", str(BASELINE), "--ckpt_path", str(checkpoint)]
    with pytest.raises(error, match=message):
        main([*base, "--output", str(tmp_path / "out"), *arguments])
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


def test_cli_export_refuses_a_non_empty_output_folder(tmp_path) -> None:
    from lightning_3d.cli import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("mine")
    checkpoint = tmp_path / "empty.ckpt"
    checkpoint.write_bytes(b"")
    base = ["export", "--config", str(BASELINE), "--ckpt_path", str(checkpoint)]
    with pytest.raises(FileExistsError, match="--overwrite"):
        main([*base, "--output", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="--ckpt_path"):
        main([*base[:-1], str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "new")])


def test_cli_export_reads_a_runs_saved_config(tmp_path) -> None:
    """The config.yaml a run saves carries fit's ckpt_path and weights_only: export accepts it
    (and then reads the checkpoint, which here is not a Lightning one)."""
    import torch

    from lightning_3d.cli import main

    saved = tmp_path / "config.yaml"
    saved.write_text(BASELINE.read_text() + "ckpt_path: null\nweights_only: null\n")
    torch.save({"weights": 1}, tmp_path / "other.ckpt")
    args = ["export", "--config", str(saved), "--ckpt_path", str(tmp_path / "other.ckpt")]
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        main([*args, "--output", str(tmp_path / "out"), "--formats", "hf"])
    assert not (tmp_path / "out").exists()


def test_a_budget_in_the_yaml_is_solved_before_training_and_export_rebuilds_it(tmp_path) -> None:
    from lightning_3d.callbacks import PlanCoordinator
    from lightning_3d.cli import Lightning3DCLI, _ExportCLI
    from lightning_3d.curriculum import token_share
    from lightning_3d.sampling import read_lengths
    from lightning_3d.vocabulary import observed_token_ids, removed_share, special_token_ids

    overrides = [
        "--config",
        str(BUDGET_CONFIG),
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.batch_size=4",
        "--data.init_args.max_length=16",
        "--plan.vocabulary=train",  # trained trimmed, the unused rows held apart, exported
        "--plan.unseen_tokens=pretrained",
        "--plan.quantize_at=export",  # int8 by ONNX Runtime: QAT leaves a trimmed table fp32
        "--plan.embedding_bits=4",  # the token table in 4-bit blocks
        "--plan.group_by_length=50",  # batches of similar length: steps priced at their tokens
    ]
    cli = Lightning3DCLI(
        subclass_mode_model=True, subclass_mode_data=True, run=False, args=overrides
    )
    coordinator = cli.trainer.callbacks[0]
    assert isinstance(coordinator, PlanCoordinator)
    plan, allocation = coordinator.plan, coordinator.plan.allocation
    assert plan.budget is None and allocation is not None  # solved, with its reasons
    assert allocation.time_fraction <= 0.5 and allocation.size_fraction <= 0.25
    assert plan.weight_bits == allocation.weight_bits and plan.sparsity == allocation.sparsity
    assert plan.prune_pattern == "heads+neurons" and "time budget 0.5" in allocation.reason
    assert cli.trainer.max_steps == (-1 if plan.max_steps is None else plan.max_steps)
    assert (tmp_path / "cost_model.json").exists()  # the measured step costs, for export
    special, _ = special_token_ids(cli.model.tokenizer)
    kept = observed_token_ids(cli.datamodule.train_dataloader(), always=special)
    assert allocation.vocabulary_share == removed_share(cli.model.model, len(kept)) > 0.2
    assert "vocabulary trimmed to the training data's tokens in training" in allocation.reason
    assert "token-embedding table exported at 5 bits" in allocation.reason
    lengths = read_lengths(cli.datamodule.splits["train"], "input_ids")
    assert allocation.token_share == token_share(lengths, 4, 50, plan.seed) < 1.0
    assert "batches grouped by length" in allocation.reason
    kinds = [type(c).__name__ for c in plan.callbacks()]
    assert kinds[:3] == ["PlanCoordinator", "VocabularyTrimmer", "CurriculumSampler"]
    exporting = _ExportCLI(
        subclass_mode_model=True, subclass_mode_data=True, run=False, args=overrides
    )
    assert [type(c).__name__ for c in exporting.run_callbacks][: len(kinds)] == kinds
    rebuilt = exporting.run_callbacks[0].plan
    assert rebuilt == plan and rebuilt.allocation.strengths == allocation.strengths


def test_export_stores_the_token_tables_at_the_bits_the_runs_plan_sets(tmp_path) -> None:
    """One step of a plan that trims the vocabulary, holds the unseen tokens' rows apart and
    sets their bits; ``lightning-3d export`` with no bits given takes them from the plan: the
    trained rows in int8, the rows held apart in 4-bit blocks."""
    import onnx

    from lightning_3d.cli import main

    run = [
        "--config", str(BASELINE), "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.batch_size=4",
        "--data.init_args.max_length=16", "--plan.vocabulary=train",
        "--plan.unseen_tokens=pretrained", "--plan.weight_bits=8", "--plan.quantize_at=export",
        "--plan.embedding_bits=8", "--plan.unseen_token_bits=4",
    ]  # fmt: skip
    short = ["--trainer.max_steps=1", "--trainer.val_check_interval=1"]
    main(["fit", *run, *short, "--trainer.limit_val_batches=1", "--test_after_fit=false"])
    (checkpoint,) = tmp_path.rglob("best-*.ckpt")
    out = tmp_path / "deploy"
    main([
        "export", *run, "--ckpt_path", str(checkpoint), "--output", str(out),
        "--formats", "onnx-int8", "--eval_split", "none", "--latency_rounds", "0",
    ])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert any(
        "trained token rows in int8 and the pretrained rows held apart in 4-bit" in note
        for note in report["notes"]
    ), report["notes"]
    graph = onnx.load(str(out / "onnx-int8" / "model.onnx")).graph
    reads = {n.input[0]: n.op_type for n in graph.node if "word_embeddings" in n.input[0]}
    assert reads["model.bert.embeddings.word_embeddings.unseen_weight_Q4"] == (
        "GatherBlockQuantized"
    )
    assert reads["model.bert.embeddings.word_embeddings.weight_quantized"] == "Gather"  # int8
    # the flag wins over the plan: both at 8 bits, one int8 table of every id
    main([
        "export", *run, "--ckpt_path", str(checkpoint), "--output", str(tmp_path / "eight"),
        "--formats", "onnx-int8", "--eval_split", "none", "--latency_rounds", "0",
        "--unseen_token_bits", "8",
    ])  # fmt: skip
    graph = onnx.load(str(tmp_path / "eight" / "onnx-int8" / "model.onnx")).graph
    ops = [n.op_type for n in graph.node if "word_embeddings" in n.input[0]]
    assert ops == ["Gather"] and "GatherBlockQuantized" not in {n.op_type for n in graph.node}


def test_a_budget_that_cannot_be_met_fails_before_training(tmp_path) -> None:
    from lightning_3d.budget import CostModel
    from lightning_3d.cli import Lightning3DCLI

    calibration = tmp_path / "cost.json"
    CostModel(forward_s=0.1, backward_s=0.2, optimizer_s=0.05).save(calibration)
    with pytest.raises(ValueError, match=r"time=0\.01 cannot be met"):
        Lightning3DCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=[
                "--config",
                str(BUDGET_CONFIG),
                "--trainer.logger=false",
                f"--trainer.default_root_dir={tmp_path}",
                "--plan.budget.time=0.01",
                f"--plan.budget.calibration={calibration}",
            ],
        )
