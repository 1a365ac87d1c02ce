"""The ablation table of `qa-train abstain` runs (training/README.md), from their metrics.json files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _row(name: str, summary: dict[str, Any], which: str) -> str:
    scores = summary[which]
    v1, v2 = scores["v1.1"], scores["v2.0"]
    second, zero = v2["second_half"], v2["second_half_threshold_0"]
    kinds = (
        "–" if which == "start" else ", ".join(summary["negative_examples"]) + f" ({summary['negative_windows']:,} w)"
    )
    distil = "–" if which == "start" or summary["config"]["distill_alpha"] >= 1 else "self"
    return (
        f"| {name} | {kinds} | {distil} | {v1['exact_match']:.2f} | {v1['f1']:.2f} | {v2['null_threshold']:.3f} | "
        f"{v2['first_half']['f1']:.2f} | {second['f1']:.2f} | {second['HasAns_f1']:.2f} | {second['NoAns_f1']:.2f} | "
        f"{second['best_f1']:.2f} | {zero['f1']:.2f} |"
    )


def ablation_table(results_dir: Path, names: list[str]) -> str:
    lines = [
        "| model | negatives (windows) | distil | v1.1 EM | v1.1 F1 | threshold (1st half) | 1st-half F1 "
        "| **2nd-half F1** | 2nd HasAns F1 | 2nd NoAns F1 | 2nd best F1 (oracle) | 2nd F1 at threshold 0 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    start_done = False
    for name in names:
        path = results_dir / name / "metrics.json"
        if not path.is_file():
            lines.append(f"| {name} | did not finish | | | | | | | | | | |")
            continue
        summary = json.loads(path.read_text(encoding="utf-8"))
        if summary.get("start") and not start_done:
            lines.append(_row("shipped (start model)", summary, "start"))
            start_done = True
        lines.append(_row(name, summary, "tuned"))
    return "\n".join(lines)


if __name__ == "__main__":
    print(ablation_table(Path(sys.argv[1]), sys.argv[2:]))
