"""Generate the Python protobuf/gRPC modules from proto/ into packages matching the proto paths.

`proto/qa/v1/qa.proto` becomes the importable module `qa.v1.qa_pb2` (and `qa_pb2_grpc`) at the
repository root. Run by `make proto` and by setup.py at install time; the output is never committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def generate(out_dir: Path = ROOT) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    sources = sorted(PROTO_ROOT.rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(source) for source in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Make every generated folder a regular package so `import qa.v1.qa_pb2` works everywhere.
    for source in sources:
        package_dir = out_dir / source.parent.relative_to(PROTO_ROOT)
        while package_dir != out_dir:
            (package_dir / "__init__.py").touch()
            package_dir = package_dir.parent
    return sources


if __name__ == "__main__":
    for source in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT):
        print(f"generated {source.relative_to(ROOT)}")
