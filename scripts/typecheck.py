"""mypy over the `realtime_qa` namespace, laid out as it installs (`make lint`).

The repository keeps its folders at the top level and `realtime_qa/__init__.py` reaches them at run time by
extending the package's search path, which a static checker cannot follow. So mypy runs in build/typecheck/, a tree
of symbolic links shaped like the installed package (realtime_qa/qacore -> ../../qacore, ...), plus the tests,
with the project's own mypy settings.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "realtime_qa"
FOLDERS = ("qacore", "services", "pipeline", "builder", "training", "benchmarks", "tests")


def link_tree(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    package = out / NAMESPACE
    package.mkdir(parents=True)
    for entry in (ROOT / NAMESPACE).iterdir():  # __init__.py and the generated gRPC packages
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for folder in FOLDERS:
        (package if folder != "tests" else out).joinpath(folder).symlink_to(ROOT / folder)


def main() -> int:
    out = ROOT / "build" / "typecheck"
    link_tree(out)
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), NAMESPACE, "tests"]
    return subprocess.run(command, cwd=out, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
