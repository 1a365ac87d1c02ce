"""Run a Python module with every garbage collection timed: does the collector explain latency spikes?

    python -m realtime_qa.benchmarks.device.gc_trace --out gc.json -- -m realtime_qa.services.cli --port 50051

At exit (normal exit, or SIGTERM handled by the program) writes, per generation, the number of collections,
their total and largest pause (ms), and how many paused longer than 2 ms.
"""

from __future__ import annotations

import atexit
import gc
import json
import runpy
import sys
import time
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 5 or sys.argv[1] != "--out" or sys.argv[3] != "--" or sys.argv[4] != "-m":
        sys.exit("usage: gc_trace --out FILE -- -m MODULE [ARGS...]")
    out = Path(sys.argv[2])
    module = sys.argv[5]
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started: list[int] = [0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter_ns()
        else:
            pauses[info["generation"]].append((time.perf_counter_ns() - started[0]) / 1e6)

    def write() -> None:
        summary = {
            f"gen{generation}": {
                "collections": len(values),
                "total_ms": round(sum(values), 2),
                "max_ms": round(max(values, default=0.0), 2),
                "over_2ms": sum(value > 2 for value in values),
            }
            for generation, values in pauses.items()
        }
        summary["switch_interval_s"] = sys.getswitchinterval()  # type: ignore[assignment]
        out.write_text(json.dumps(summary, indent=1) + "\n")

    gc.callbacks.append(callback)
    atexit.register(write)
    sys.argv = [module, *sys.argv[6:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
