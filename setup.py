"""Install-time code generation and the one import namespace.

The gRPC modules are generated from proto/ into realtime_qa/ before packaging. The repository's top-level
folders install as subpackages of `realtime_qa` (package-dir mapping), so nothing of ours is a top-level
package in the user's environment; `models/` (the shipped models) installs as `realtime_qa.models`.
"""

import importlib.util
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
assert _spec is not None and _spec.loader is not None
_gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gen)
if any(ROOT.joinpath("proto").rglob("*.proto")):
    _gen.generate()

NAMESPACE = "realtime_qa"
FOLDERS = ("qacore", "builder", "services", "pipeline", "training", "benchmarks", "models")

package_dir = {NAMESPACE: NAMESPACE}
packages = [NAMESPACE, *(f"{NAMESPACE}.{name}" for name in find_packages(where=NAMESPACE))]
for folder in FOLDERS:
    package_dir[f"{NAMESPACE}.{folder}"] = folder
    packages += [f"{NAMESPACE}.{folder}", *(f"{NAMESPACE}.{folder}.{name}" for name in find_packages(where=folder))]

setup(packages=packages, package_dir=package_dir)
