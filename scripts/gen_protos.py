"""Generate the Python protobuf/gRPC modules from proto/ into the `realtime_qa` namespace.

`proto/qa/v1/qa.proto` becomes the importable module `realtime_qa.qa.v1.qa_pb2` (and `qa_pb2_grpc`) in
realtime_qa/. protoc writes imports between generated modules from the proto paths (`from qa.v1 import
qa_pb2`); they are rewritten into the namespace so that no generated package is top-level. Run by `make proto`
and by setup.py at install time; the output is never committed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
NAMESPACE = "realtime_qa"
OUT_DIR = ROOT / NAMESPACE


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
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
    # Make every generated folder a regular package so `import realtime_qa.qa.v1.qa_pb2` works everywhere.
    for source in sources:
        package_dir = out_dir / source.parent.relative_to(PROTO_ROOT)
        while package_dir != out_dir:
            (package_dir / "__init__.py").touch()
            package_dir = package_dir.parent
    top_level = sorted({source.relative_to(PROTO_ROOT).parts[0] for source in sources})
    into_namespace = re.compile(rf"^(from|import) ({'|'.join(map(re.escape, top_level))})(?=[.\s])", re.MULTILINE)
    for source in sources:
        stem = out_dir / source.relative_to(PROTO_ROOT).with_suffix("")
        for generated in (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"):
            path = Path(generated)
            text = path.read_text()
            path.write_text(into_namespace.sub(rf"\1 {NAMESPACE}.\2", text))
    return sources


if __name__ == "__main__":
    for source in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(f"generated {source.relative_to(ROOT)}")
