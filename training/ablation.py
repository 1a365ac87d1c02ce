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
    config = summary["config"]
    if which == "tuned" and summary.get("soup_of"):
        distil = "mean of the weights of " + " + ".join(f"`{part['run']}`" for part in summary["soup_of"])
    elif which == "start" or config["distill_alpha"] >= 1:
        distil = "–"
    else:
        teacher = f"teacher `{config['teacher']}`" if config.get("teacher") else "self"
        distil = f"{teacher}, α {config['distill_alpha']:g}, T {config['distill_temperature']:g}"
    epochs = "–" if which == "start" else config["epochs"]
    return (
        f"| {name} | {kinds} | {distil} | {epochs} | {v1['exact_match']:.2f} | {v1['f1']:.2f} | "
        f"{v2['null_threshold']:.3f} | "
        f"{v2['first_half']['f1']:.2f} | {second['f1']:.2f} | {second['HasAns_f1']:.2f} | {second['NoAns_f1']:.2f} | "
        f"{second['best_f1']:.2f} | {zero['f1']:.2f} |"
    )


def ablation_table(results_dir: Path, names: list[str]) -> str:
    """One row per run (`names`: folders of `results_dir`, a name may be SUBFOLDER/RUN), after the start model's row
    (from the first run that scored it)."""
    lines = [
        "| model | negatives (windows) | distil | epochs | v1.1 EM | v1.1 F1 | threshold (1st half) | 1st-half F1 "
        "| **2nd-half F1** | 2nd HasAns F1 | 2nd NoAns F1 | 2nd best F1 (oracle) | 2nd F1 at threshold 0 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    start_done = False
    for name in names:
        path = results_dir / name / "metrics.json"
        label = Path(name).name
        summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if summary.get("start") and not start_done:
            lines.append(_row("shipped (start model)", summary, "start"))
            start_done = True
        if "tuned" not in summary:  # no metrics, or those a cut-short run wrote after an epoch
            steps = summary.get("steps")
            done = f" ({steps:,} of {summary['total_steps']:,} steps recorded)" if steps else ""
            lines.append(f"| {label} | did not finish{done} | | | | | | | | | | | |")
            continue
        lines.append(_row(label, summary, "tuned"))
    return "\n".join(lines)


if __name__ == "__main__":
    print(ablation_table(Path(sys.argv[1]), sys.argv[2:]))
