"""Install-time code generation: the gRPC modules are produced from proto/ before packaging."""

import importlib.util
from pathlib import Path

from setuptools import find_packages, setup

_spec = importlib.util.spec_from_file_location("gen_protos", Path(__file__).parent / "scripts" / "gen_protos.py")
assert _spec is not None and _spec.loader is not None
_gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gen)
if any(Path(__file__).parent.joinpath("proto").rglob("*.proto")):
    _gen.generate()

# The repository's top-level packages, and the shipped models: models/ installed as the package
# `realtime_qa_models` (its package-dir mapping and package data are in pyproject.toml).
PACKAGES = [
    "qacore*",
    "builder*",
    "services*",
    "pipeline*",
    "training*",
    "benchmarks*",
    "qa*",
    "assistant*",
    "asr*",
    "response*",
]
setup(packages=[*find_packages(include=PACKAGES), "realtime_qa_models"])
