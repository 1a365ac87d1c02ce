"""Print the project's runtime requirements (pyproject.toml), the gRPC and protobuf packages pinned to the versions
this interpreter has: another interpreter's environment built from them (`make test-py312`) imports the gRPC
modules that this one's install generated into realtime_qa/, whose generated code requires those versions or newer."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

PINNED = ("grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf")


def requirements(pyproject: Path) -> list[str]:
    listed = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    out = []
    for requirement in listed:
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        out.append(f"{name}=={importlib.metadata.version(name)}" if name in PINNED else requirement)
    return out


if __name__ == "__main__":
    print("\n".join(requirements(Path(__file__).resolve().parents[1] / "pyproject.toml")))
