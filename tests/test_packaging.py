"""Packaging: the folder mapping works in a built wheel and in the editable install."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAPPED = {
    "callbacks": "lightning_3d/callbacks",
    "strategies": "lightning_3d/strategies",
    "csrc": "lightning_3d/csrc",
}
IMPORT_CHECK = (
    "import json, lightning_3d, lightning_3d.callbacks, lightning_3d.strategies, lightning_3d.csrc;"
    "print(json.dumps({m.__name__: m.__file__ for m in "
    "(lightning_3d, lightning_3d.callbacks, lightning_3d.strategies, lightning_3d.csrc)}))"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("lightning_3d-*.whl")
    return path


def _import_locations(env_path: Path | None, cwd: Path) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin"}
    if env_path is not None:
        env["PYTHONPATH"] = str(env_path)
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout)


def test_wheel_holds_mapped_packages_and_kernel_sources(wheel) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("__init__", "cli", "data", "tasks"):
        assert f"lightning_3d/{module}.py" in names
    for source, target in MAPPED.items():
        for file in (REPO / source).iterdir():
            if file.is_file() and file.suffix in {".py", ".h", ".cpp", ".cu", ".cuh", ".md"}:
                assert f"{target}/{file.name}" in names, file
    assert not any(
        name.startswith(("tests/", "callbacks/", "strategies/", "csrc/")) for name in names
    )
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert re.search(r"lightning-3d\s*=\s*lightning_3d\.cli:main", text)


def test_wheel_imports_mapped_packages(wheel, tmp_path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    located = _import_locations(site, cwd=tmp_path)
    for name, location in located.items():
        assert Path(location).is_relative_to(site), (name, location)
    assert Path(located["lightning_3d.callbacks"]) == site / "lightning_3d/callbacks/__init__.py"


def test_editable_install_maps_the_top_level_folders(tmp_path) -> None:
    # the installed distribution, not the egg-info that building the wheel leaves in the tree
    installs = [
        json.loads(text)
        for dist in metadata.distributions(name="lightning-3d")
        if (text := dist.read_text("direct_url.json"))
    ]
    if not any(install.get("dir_info", {}).get("editable") for install in installs):
        pytest.skip("lightning-3d is not installed in editable mode here")
    located = _import_locations(None, cwd=tmp_path)
    assert Path(located["lightning_3d.callbacks"]) == REPO / "callbacks" / "__init__.py"
    assert Path(located["lightning_3d.strategies"]) == REPO / "strategies" / "__init__.py"
    assert Path(located["lightning_3d.csrc"]) == REPO / "csrc" / "__init__.py"


def _readme_block(heading: str) -> str:
    """The first ```bash block after `heading` in the README, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading) :]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return " ".join(line.rstrip("\\ ").strip() for line in block.strip().splitlines())


def test_ci_runs_the_readme_commands() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    ci_commands = " ".join(line.rstrip("\\ ").strip() for line in ci.splitlines())
    setup = _readme_block("## Set up and run the main job")
    install, _, main_job = setup.partition(" && lightning-3d fit")
    assert main_job.startswith(" --config examples/configs/rt_minilm_baseline.yaml")
    assert install in ci_commands
    assert _readme_block("## Run the tests") in ci_commands


def test_ci_also_tests_the_lowest_lightning_that_pyproject_allows() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    bound = re.search(r'"lightning>=([0-9.]+)"', pyproject)
    assert bound is not None, "pyproject.toml has no lightning>= bound"
    ci = (REPO / ".ci" / "run").read_text()
    assert f'"lightning=={bound.group(1)}"' in ci


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff_is_clean(command: list[str]) -> None:
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    result = subprocess.run(
        [str(ruff), *command, str(REPO)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stdout[-3000:]
