"""The layering the design card draws, enforced: import-linter contracts (pyproject.toml) and what loads at run time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_import_linter_contracts_are_kept() -> None:
    done = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "3 kept, 0 broken" in report, report


def test_request_time_entry_points_never_load_the_builder() -> None:
    """The server, the assistant CLI and the evaluator start without the ONNX build toolchain."""
    code = (
        "import sys\n"
        "import services.server, services.models, pipeline.assistant_cli, qacore.eval_cli, qacore.default_engine\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('builder', 'torch', 'onnx')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
