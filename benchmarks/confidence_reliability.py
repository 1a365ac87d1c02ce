"""Reliability of the confidence an engine returns (what qa.v1 callers and the response stage see), on SQuAD v2.0.

Runs the engine over one half of the v2.0 dev articles with abstention on and the engine's own defaults (the
model's threshold and confidence calibration from meta.json), and tables accuracy by confidence bucket, for all
questions and for the answered and the abstained ones apart. Right: an abstention on an unanswerable question,
or an answer that matches a gold answer exactly (the official normalisation).

    python -m realtime_qa.benchmarks.confidence_reliability --engine E --squad-json dev-v2.0.json.gz \
        [--article-half second] [--limit N] [--out-file reliability.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from realtime_qa.qacore.answerer import QuestionAnswerer
from realtime_qa.qacore.bundle import open_bundle
from realtime_qa.qacore.squad import read_dataset
from realtime_qa.qacore.squad_metric import exact_match, gold_answers_v2

BUCKETS = (0.0, 0.3, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0000001)
BATCH = 16


def table(rows: list[tuple[float, bool]]) -> list[dict[str, object]]:
    out = []
    for low, high in itertools.pairwise(BUCKETS):
        inside = [(c, right) for c, right in rows if low <= c < high]
        out.append(
            {
                "bucket": f"[{low:.2f}, {min(high, 1.0):.2f}{']' if high > 1 else ')'}",
                "questions": len(inside),
                "mean_confidence": round(sum(c for c, _ in inside) / len(inside), 4) if inside else None,
                "accuracy": round(sum(r for _, r in inside) / len(inside), 4) if inside else None,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", type=Path, required=True)
    parser.add_argument("--squad-json", type=Path, required=True)
    parser.add_argument("--article-half", choices=("first", "second"), default="second")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--out-file", type=Path)
    args = parser.parse_args(argv)
    dataset = read_dataset(args.squad_json).article_half(args.article_half)
    if args.limit is not None:
        dataset = dataset.head(args.limit)
    rows: dict[str, list[tuple[float, bool]]] = {"all": [], "answered": [], "abstained": []}
    with open_bundle(args.engine) as bundle:
        answerer = QuestionAnswerer.from_bundle(bundle, bundle.decoder(allow_null=True))
        pairs = list(dataset.questions())
        for start in range(0, len(pairs), BATCH):
            chunk = pairs[start : start + BATCH]
            results = answerer.answer_many([(question.question, paragraph.context) for paragraph, question in chunk])
            for (_, question), result in zip(chunk, results, strict=True):
                prediction = result.prediction
                if prediction.abstained:
                    right = not question.has_answer
                else:
                    right = any(exact_match(prediction.text, gold) for gold in gold_answers_v2(question.answer_texts))
                kind = "abstained" if prediction.abstained else "answered"
                rows["all"].append((prediction.confidence, right))
                rows[kind].append((prediction.confidence, right))
        meta = bundle.meta
    tables = {kind: table(found) for kind, found in rows.items()}
    report = {
        "engine": f"{meta.backend}-{meta.precision}",
        "dataset": f"{args.squad_json.name}, {args.article_half} half of the articles ({dataset.num_questions} q)",
        "null_threshold": meta.null_threshold,
        "confidence_calibration": meta.confidence_calibration.to_dict() if meta.confidence_calibration else None,
        **tables,
    }
    text = json.dumps(report, indent=2)
    if args.out_file is not None:
        args.out_file.write_text(text + "\n", encoding="utf-8")
    print(text)
    for kind, rows_of_kind in tables.items():
        print(f"\n{kind}: | confidence | questions | mean confidence | accuracy |", file=sys.stderr)
        for row in rows_of_kind:
            cells = (row["bucket"], row["questions"], row["mean_confidence"], row["accuracy"])
            print("| " + " | ".join(map(str, cells)) + " |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
