"""The deploy path: a regular (non-editable) `pip install .` into a fresh venv answers the demo questions.

Fast enough for every CI run: the fresh venv reuses this venv's third-party packages through a .pth
file (so nothing is downloaded: `--no-deps --no-build-isolation --no-index`), and only this project is
built and installed, from a copy of the working tree, as the Dockerfile does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from realtime_qa.pipeline.assistant_cli import DEMO_QUESTIONS

REPO = Path(__file__).resolve().parents[1]


def project_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files: what a clean checkout of this tree would hold."""
    done = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=60,
    )
    return [name for name in done.stdout.decode().split("\0") if name and (REPO / name).is_file()]


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("install")
    source = root / "src"
    for name in project_files():
        if name.startswith("tests/"):
            continue
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    # Third-party packages (and pip, setuptools) come from this venv; this project must not.
    (Path(purelib) / "parent-site-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(source)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    shutil.rmtree(source)  # the installed copy must not need the source tree
    return venv


def test_the_installed_package_uses_its_own_files(installed_venv: Path, tmp_path: Path) -> None:
    code = (
        "import realtime_qa.qacore as qacore, realtime_qa.services as services, realtime_qa.builder as builder\n"
        "from realtime_qa.qacore.default_engine import shipped_model_dir\n"
        "print(qacore.__file__); print(services.__file__); print(builder.__file__); print(shipped_model_dir())\n"
    )
    done = subprocess.run(
        [str(installed_venv / "bin" / "python"), "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    paths = done.stdout.split()
    assert all(path.startswith(str(installed_venv)) and "site-packages" in path for path in paths), paths
    assert paths[-1].endswith("realtime_qa/models/minilm-l6-squad")


FOLDERS = ("qacore", "services", "pipeline", "builder", "training", "benchmarks", "models", "qa", "assistant", "asr")


def test_the_installed_package_has_one_top_level_name(installed_venv: Path, tmp_path: Path) -> None:
    """Everything of ours is under `realtime_qa`: a user's own `services` or `qacore` package stays theirs."""
    for folder in FOLDERS:  # the user's packages of the same names, first on the path
        (tmp_path / "theirs" / folder).mkdir(parents=True)
        (tmp_path / "theirs" / folder / "__init__.py").write_text("OWNER = 'user'\n")
    code = (
        "import importlib\n"
        f"print(all(importlib.import_module(name).OWNER == 'user' for name in {FOLDERS!r}))\n"
        "import realtime_qa.services.server, realtime_qa.pipeline.assistant_cli, realtime_qa.builder.cli\n"
        "print(realtime_qa.services.server.__file__)\n"
    )
    done = subprocess.run(
        [str(installed_venv / "bin" / "python"), "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "theirs")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    theirs_win, server_file = done.stdout.split()
    assert theirs_win == "True"
    assert server_file.startswith(str(installed_venv))
    top_level = sorted(installed_venv.glob("lib/python*/site-packages/realtime_qa-*.dist-info/top_level.txt"))
    if top_level:  # written by setuptools for regular installs
        assert top_level[0].read_text().split() == ["realtime_qa"]


def test_the_installed_cli_answers_the_demo_questions(installed_venv: Path, tmp_path: Path) -> None:
    """`qa-assistant --demo` of the installed package: the default engine is found or built from package data."""
    done = subprocess.run(
        [str(installed_venv / "bin" / "qa-assistant"), "--demo", "--json"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["question"] for row in rows] == list(DEMO_QUESTIONS)
    assert "high performance deep learning inference platform" in rows[0]["answer"]
    assert rows[1]["answer"].startswith("parsers to import models")
