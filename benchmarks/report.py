"""Helpers every benchmark shares: percentile summaries, Markdown table cells and a description of the machine."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np
from realtime_qa.qacore.latency import QA_SERVER_STAGES

Number = TypeVar("Number", int, float)

# The QA stages an answer computed in process goes through: the server's stages without the batcher's queue.
IN_PROCESS_STAGES = tuple(name for name in QA_SERVER_STAGES.names if name != "queue")


def percentile_summary(values: np.ndarray) -> dict[str, float]:
    """mean, p50, p90, p95, p99, min and max of a sample, rounded for reports."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {}
    p50, p90, p95, p99 = np.percentile(values, [50, 90, 95, 99])
    return {
        "mean": round(float(values.mean()), 4),
        "p50": round(float(p50), 4),
        "p90": round(float(p90), 4),
        "p95": round(float(p95), 4),
        "p99": round(float(p99), 4),
        "min": round(float(values.min()), 4),
        "max": round(float(values.max()), 4),
        "n": int(values.size),
    }


def number_list(text: str, kind: Callable[[str], Number] = int) -> tuple[Number, ...]:
    """An argparse type: "1,2,4" as a tuple of `kind`; anything else is a one-line usage error."""
    try:
        return tuple(kind(part) for part in text.split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def loop_name() -> str:
    """The running event loop's kind, for the results: "uvloop" or "asyncio"."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


def table_head(header: str) -> list[str]:
    """The first lines of a Markdown table: `header` ("| a | b |") and the separator row under it."""
    return [header, "|" + "---|" * (header.count("|") - 1)]


def errors_cell(codes: Mapping[str, int]) -> str:
    """A table cell of the calls that did not end OK ("UNAVAILABLE 3, DEADLINE_EXCEEDED 1"), or "-"."""
    return ", ".join(f"{code} {count}" for code, count in codes.items() if code != "OK") or "-"


def machine_description() -> str:
    """CPU model, core count and OS, e.g. for the header of a results table."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"
