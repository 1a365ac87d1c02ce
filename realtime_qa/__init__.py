"""realtime-qa's one import namespace.

The repository keeps its top-level folders (qacore, services, pipeline, builder, training, benchmarks, models);
installed, they are the subpackages `realtime_qa.qacore`, `realtime_qa.services`, ... (setuptools package-dir
mapping in setup.py), so they never collide with anything else of those names in a user's environment. The
gRPC modules generated from proto/ live here as `realtime_qa.qa.v1`, `realtime_qa.assistant.v1`, ...

Run from a source checkout without installing (PYTHONPATH at the repository, as the GPU machine's scripts do),
those folders sit beside this one: the search path is extended to the repository root so that
`realtime_qa.qacore` resolves to ./qacore. An installed copy has no pyproject.toml above it and is left alone.
"""

from __future__ import annotations

from pathlib import Path

SUBPACKAGES = ("qacore", "services", "pipeline", "builder", "training", "benchmarks", "models")


def _source_root() -> Path | None:
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if (
        pyproject.is_file()
        and (root / "qacore" / "__init__.py").is_file()
        and 'name = "realtime-qa"' in pyproject.read_text()
    ):
        return root
    return None


_root = _source_root()
if _root is not None and str(_root) not in __path__:
    __path__.append(str(_root))
