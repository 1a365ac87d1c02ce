"""`qa-train`: fine-tune, distil and ship the SQuAD student; fine-tune and pack the MPNet teacher.

Commands (see training/README.md for the whole recipe):
  finetune      train the student on gold spans (config with distill_alpha 1)
  distill       train the student against gold spans and a teacher run's logits
  teacher       fine-tune the MPNet teacher and save its logits on the training windows
  pack-teacher  cut the teacher's weights into fp16 pieces that fit one device call each
  ship          put an exported run (model.tar.partNN + export.json) into models/minilm-l6-squad
  negatives     tune a trained model (--base) with synthetic unanswerable questions; score it and the start
                model on SQuAD v1.1 dev and v2.0 dev (--squad-dir also holds dev-v2.0.json.gz)
  hard-negatives  write the harder negatives (own paragraph without the answer sentence, swapped entity,
                negated question, BM25 distractor paragraph) made from SQuAD v1.1 train, as xz JSONL
  abstain       tune a trained model (--base) on SQuAD v1.1 plus a hard-negatives file (optionally distilled
                from itself, or from a teacher run trained with the same negatives: --teacher-dir); tune the
                abstention threshold on the first half of v2.0 dev articles, report on the second
  soup          average the weights of finished `abstain` runs of one start model (--runs), then score and
                export the average exactly as `abstain` scores a run
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from realtime_qa.qacore.cli_args import OneLineParser
from realtime_qa.qacore.errors import QAError
from realtime_qa.training.config import TrainConfig
from realtime_qa.training.runs import RunPaths

DEFAULT_SQUAD_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "models" / "minilm-l6-squad"


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="training config JSON (training/configs/)")
    parser.add_argument("--squad-dir", type=Path, default=DEFAULT_SQUAD_DIR, help="holds train/dev-v1.1.json.gz")
    parser.add_argument("--base", type=Path, required=True, help="student base encoder directory (and tokenizer)")
    parser.add_argument("--cache-dir", type=Path, required=True, help="where featurized windows are kept")
    parser.add_argument("--run-dir", type=Path, required=True, help="checkpoint, logs, metrics and the export")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="qa-train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run_arguments(commands.add_parser("finetune", help="train the student on gold spans"))
    distill = commands.add_parser("distill", help="train the student on gold spans and teacher logits")
    _add_run_arguments(distill)
    distill.add_argument("--teacher-run", type=Path, required=True, help="run directory of `qa-train teacher`")
    teacher = commands.add_parser("teacher", help="fine-tune the MPNet teacher and save its logits")
    _add_run_arguments(teacher)
    teacher.add_argument("--pieces", type=Path, nargs="+", required=True, help="piece folders of `pack-teacher`")
    pack = commands.add_parser("pack-teacher", help="cut the teacher's weights into fp16 pieces")
    pack.add_argument("--source", type=Path, required=True, help="all-mpnet-base-v2 directory (model.safetensors)")
    pack.add_argument("--out", type=Path, required=True, help="folder for the piece folders p1, p2, ...")
    pack.add_argument("--piece-mib", type=float, default=60.0, help="largest piece in MiB (default 60)")
    _add_run_arguments(
        commands.add_parser("negatives", help="tune a trained model with synthetic unanswerable questions")
    )
    hard = commands.add_parser("hard-negatives", help="make the harder negatives from SQuAD v1.1 train")
    hard.add_argument("--squad-dir", type=Path, default=DEFAULT_SQUAD_DIR, help="holds train-v1.1.json.gz")
    hard.add_argument("--out", type=Path, required=True, help="xz-compressed JSONL file to write")
    hard.add_argument("--rate", type=float, default=0.25, help="share of train questions drawn per kind")
    hard.add_argument("--seed", type=int, default=42)
    abstain = commands.add_parser("abstain", help="tune a trained model on SQuAD v1.1 plus hard negatives")
    _add_run_arguments(abstain)
    abstain.add_argument("--negatives", type=Path, required=True, help="file of `qa-train hard-negatives`")
    abstain.add_argument("--score-start", action="store_true", help="also score the start model")
    abstain.add_argument(
        "--teacher-dir",
        type=Path,
        help="the model/ folder of the run the config's `teacher` names (born-again teacher)",
    )
    soup = commands.add_parser("soup", help="average finished abstain runs' weights; score and export it")
    soup.add_argument("--name", required=True, help="the soup's run name (its metrics.json config name)")
    soup.add_argument("--runs", type=Path, nargs="+", required=True, help="run directories of `qa-train abstain`")
    soup.add_argument("--squad-dir", type=Path, default=DEFAULT_SQUAD_DIR, help="holds dev-v1.1 and dev-v2.0 .json.gz")
    soup.add_argument("--base", type=Path, required=True, help="the start model (its tokenizer files are used)")
    soup.add_argument("--run-dir", type=Path, required=True, help="metrics, per-question scores and the export")
    ship = commands.add_parser("ship", help="install an exported run as the shipped model")
    ship.add_argument("--export-dir", type=Path, required=True, help="holds model.tar.partNN and export.json")
    ship.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model directory (default {DEFAULT_OUT})")
    ship.add_argument(
        "--null-threshold", type=float, help="also write this abstention threshold into config.json (qa_null_threshold)"
    )
    return parser


def _paths(args: argparse.Namespace) -> RunPaths:
    return RunPaths(args.squad_dir, args.base, args.cache_dir, args.run_dir)


def run(args: argparse.Namespace) -> None:
    from realtime_qa.training import runs

    if args.command in ("finetune", "distill", "teacher"):
        config = TrainConfig.from_file(args.config)
        if args.command == "finetune" and config.distills:
            raise QAError(f"{args.config} distils (distill_alpha < 1): use `qa-train distill`")
        if args.command == "distill" and not config.distills:
            raise QAError(f"{args.config} does not distil (distill_alpha is 1): use `qa-train finetune`")
        if args.command == "teacher":
            summary = runs.run_teacher(config, _paths(args), args.pieces)
        else:
            summary = runs.run_student(config, _paths(args), getattr(args, "teacher_run", None))
        print(json.dumps({"name": config.name, **summary["final"], "wall_seconds": round(summary["wall_seconds"], 1)}))
    elif args.command == "negatives":
        config = TrainConfig.from_file(args.config)
        summary = runs.run_negatives(config, _paths(args))
        print(json.dumps({"name": config.name, "baseline": summary["baseline"], "tuned": summary["tuned"]}))
    elif args.command == "hard-negatives":
        from realtime_qa.qacore.squad import read_dataset
        from realtime_qa.training.negatives import HARD_KINDS, hard_negatives, write_examples

        articles = read_dataset(args.squad_dir / runs.TRAIN_FILE).articles
        examples, stats = hard_negatives(articles, HARD_KINDS, args.rate, args.seed)
        write_examples(args.out, examples)
        print(json.dumps({"out": str(args.out), "attempted": stats.attempted, "made": stats.made}))
    elif args.command == "abstain":
        from realtime_qa.training.abstain import run_abstain

        config = TrainConfig.from_file(args.config)
        summary = run_abstain(config, _paths(args), args.negatives, args.score_start, args.teacher_dir)
        print(json.dumps({"name": config.name, "start": summary["start"], "tuned": summary["tuned"]}))
    elif args.command == "soup":
        from realtime_qa.training.soup import run_soup

        summary = run_soup(args.name, args.runs, RunPaths(args.squad_dir, args.base, args.run_dir, args.run_dir))
        print(json.dumps({"name": args.name, "tuned": summary["tuned"]}))
    elif args.command == "pack-teacher":
        from realtime_qa.training.teacher import pack_teacher

        for folder in pack_teacher(args.source, args.out, int(args.piece_mib * 1024 * 1024)):
            print(folder)
    elif args.command == "ship":
        for file in runs.ship(args.export_dir, args.out):
            print(file)
        if args.null_threshold is not None:
            from realtime_qa.training.calibration import set_null_threshold

            print(set_null_threshold(args.out, args.null_threshold))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (QAError, ValueError, FileNotFoundError, KeyError) as exc:
        print(f"qa-train: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
