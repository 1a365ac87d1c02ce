"""Install-time code generation: the gRPC modules are produced from proto/ before packaging."""

import importlib.util
from pathlib import Path

from setuptools import setup

_spec = importlib.util.spec_from_file_location("gen_protos", Path(__file__).parent / "scripts" / "gen_protos.py")
assert _spec is not None and _spec.loader is not None
_gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gen)
if any(Path(__file__).parent.joinpath("proto").rglob("*.proto")):
    _gen.generate()

setup()
