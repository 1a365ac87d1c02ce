"""The layering the design card draws, enforced: import-linter contracts (pyproject.toml) and what loads at run time."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The contracts name `realtime_qa.<folder>`. In a source checkout those folders sit beside realtime_qa/ and are
# reached through the package's search path, which import-linter reads from the imported package: so it runs
# with `realtime_qa` imported first (the same command as `make lint`).
LINT_IMPORTS = (
    "import sys, realtime_qa\nfrom importlinter.cli import lint_imports\nsys.exit(lint_imports(no_cache=True))\n"
)


def test_import_linter_contracts_are_kept() -> None:
    done = subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "3 kept, 0 broken" in report, report


def test_the_contracts_see_every_folder_of_the_namespace() -> None:
    """A contract over modules missing from the graph would pass vacuously: every folder's modules are in it."""
    code = (
        "import realtime_qa, grimp\n"
        "graph = grimp.build_graph('realtime_qa', cache_dir=None)\n"
        "print(' '.join(sorted(graph.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    modules = set(done.stdout.split())
    for module in (
        "realtime_qa.qacore.latency",
        "realtime_qa.services.server",
        "realtime_qa.pipeline.chain",
        "realtime_qa.builder.build",
        "realtime_qa.qa.v1.qa_pb2",
    ):
        assert module in modules, module


def test_request_time_entry_points_never_load_the_builder() -> None:
    """The server, the assistant CLI and the evaluator start without the ONNX build toolchain."""
    code = (
        "import sys\n"
        "import realtime_qa.services.server, realtime_qa.services.models, realtime_qa.pipeline.assistant_cli\n"
        "import realtime_qa.qacore.eval_cli, realtime_qa.qacore.default_engine\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'onnx')\n"
        "             or name.startswith('realtime_qa.builder')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# An import of a folder by its bare name (services.x rather than realtime_qa.services.x; also in `python -c`
# strings and shell heredocs) would load a second copy of the module from a source checkout, and fail in an
# installed one.
BARE_IMPORT = re.compile(r"\b(?:from|import) (?:qacore|services|pipeline|builder|training|benchmarks)\b(?=[ .,;])")


def test_nothing_imports_our_folders_by_their_bare_names() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "*.py", "*.sh", "*.md", "Makefile", "Dockerfile*"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    offenders = [
        f"{name}:{number}: {line.strip()}"
        for name in tracked
        if not name.startswith(("benchmarks/results/", "training/results/")) and (REPO / name).is_file()
        for number, line in enumerate((REPO / name).read_text(errors="replace").splitlines(), 1)
        if BARE_IMPORT.search(line.replace("realtime_qa.", "realtime_qa:"))
    ]
    assert offenders == []
