"""What a device call brings back from a set of `qa-train abstain` / `soup` runs, and which run ships.

    python -m realtime_qa.training.collect OUT WORK MIN_V1_F1 BEAT --runs RUN... --candidates RUN...

Under OUT: results.tar.gz (every run's console log, metrics.json, train_log.jsonl and per-question v2.0 scores),
summary.txt (a line per run), and, for a winner, chosen.txt + its float16 export (model.tar.partNN, export.json).
The selection rule is the one fixed in the scripts before any result comes back: among the candidates that keep
SQuAD v1.1 dev F1 >= MIN_V1_F1, the best first-half v2.0 F1; its export comes back only when that F1 beats BEAT
(the shipped model's first-half F1). The held-out second half plays no part in the choice.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

RUN_FILES = ("metrics.json", "train_log.jsonl", "v2_scores.json", "start_v2_scores.json")


def _finished(run: Path) -> dict[str, Any] | None:
    metrics = run / "metrics.json"
    if not metrics.is_file():
        return None
    summary = json.loads(metrics.read_text(encoding="utf-8"))
    return summary if "tuned" in summary else None


def _line(name: str, summary: dict[str, Any]) -> str:
    v1, v2 = summary["tuned"]["v1.1"]["f1"], summary["tuned"]["v2.0"]
    second = v2["second_half"]
    return (
        f"{name}: start {summary['start_model_sha256'][:12]} train {summary.get('train_seconds') or 0:.0f}s; "
        f"v1.1 F1 {v1:.2f}; threshold {v2['null_threshold']:.3f} first-half F1 {v2['first_half']['f1']:.2f}; "
        f"second half F1 {second['f1']:.2f} NoAns {second.get('NoAns_f1', 0):.2f} "
        f"HasAns {second.get('HasAns_f1', 0):.2f}"
    )


def collect(out: Path, work: Path, min_v1: float, beat: float, runs: list[str], candidates: list[str]) -> list[str]:
    """Pack the runs' results into `out`, choose by the rule above, copy the winner's export; the summary lines."""
    lines: list[str] = []
    scored: list[tuple[float, str]] = []
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        for name in runs:
            run = work / "runs" / name
            log = work / "logs" / f"{name}.log"
            if log.is_file():
                tar.add(log, arcname=f"{name}/console.log")
            for file in RUN_FILES:
                if (run / file).is_file():
                    tar.add(run / file, arcname=f"{name}/{file}")
            summary = _finished(run)
            if summary is None:
                lines.append(f"{name}: did not finish")
                continue
            lines.append(_line(name, summary))
            if name in candidates and summary["tuned"]["v1.1"]["f1"] >= min_v1:
                scored.append((summary["tuned"]["v2.0"]["first_half"]["f1"], name))
    if not scored:
        lines.append(f"no candidate keeps v1.1 F1 >= {min_v1}: no weights come back")
    else:
        f1, best = max(scored)
        lines.append(f"best candidate with v1.1 F1 >= {min_v1}: {best} (first-half F1 {f1:.4f}; to beat {beat})")
        if f1 > beat:
            for part in sorted((work / "runs" / best / "export").iterdir()):
                shutil.copy(part, out / part.name)
            (out / "chosen.txt").write_text(best + "\n", encoding="utf-8")
            lines.append(f"export of {best} comes back")
        else:
            lines.append("it does not beat the shipped model: no weights come back")
    (out / "summary.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m realtime_qa.training.collect", description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("work", type=Path, help="holds runs/RUN and logs/RUN.log")
    parser.add_argument("min_v1", type=float)
    parser.add_argument("beat", type=float)
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--candidates", nargs="+", required=True)
    args = parser.parse_args(argv)
    print("\n".join(collect(args.out, args.work, args.min_v1, args.beat, args.runs, args.candidates)))


if __name__ == "__main__":
    main()
