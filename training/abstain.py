"""`qa-train abstain`: tune a trained QA model (the shipped one) on SQuAD v1.1 plus prepared hard negatives.

Positives are all v1.1 train windows; negatives are the examples of a `qa-train hard-negatives` file (only the
config's `negative_kinds`), every window of which targets [CLS]. Plain cross-entropy, or (distill_alpha < 1)
distillation from one of two teachers:
- self-distillation (no `teacher` in the config): the start model's own logits on the positive windows are the
  soft target, so the model keeps what it knew about answerable questions while it learns to abstain; on negative
  windows the soft target is [CLS] alone (the start model never learnt to abstain, so its null logit is no guide);
- a teacher trained with the same negatives (`teacher` names its run, `--teacher-dir` is that run's exported
  model): its logits on the positive AND the negative windows are the soft target, so on a negative window the
  student matches the teacher's whole distribution, its null logit against the span logits, not [CLS] alone.
  The teacher has the student's size and tokenizer (born-again distillation: the MPNet teacher cannot travel to
  the GPU machine beside the data in one call).
The float16-rounded result (what would ship) is scored on SQuAD v1.1 dev (never abstaining) and SQuAD v2.0 dev,
where the abstention threshold is tuned on the first half of the articles and reported on the second
(training/calibration.py); each question's v2.0 scores are written for re-tuning elsewhere.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from realtime_qa.builder.checkpoint import load_checkpoint
from realtime_qa.builder.hf_export import save_hf_model
from realtime_qa.qacore.features import Featurizer
from realtime_qa.qacore.squad import read_dataset
from realtime_qa.qacore.tokenization import load_tokenizer, vocab_sha256
from realtime_qa.training.calibration import QuestionScore, calibrate, write_scores
from realtime_qa.training.config import TrainConfig
from realtime_qa.training.data import EvalSet, WindowArrays, build_eval_set, predict
from realtime_qa.training.negatives import HARD_KINDS, example_windows, read_examples
from realtime_qa.training.runs import DEV_V2_FILE, EXPORT_DIR, MODEL_DIR, RunPaths, _data, _device, pack_export

log = logging.getLogger(__name__)

V2_SCORES = "v2_scores.json"  # the tuned model's per-question v2.0 dev scores (QuestionScore)
START_V2_SCORES = "start_v2_scores.json"  # the same of the start model


def score_v2(model: Any, eval_set: EvalSet, config: TrainConfig, device: Any) -> dict[str, QuestionScore]:
    from realtime_qa.training.finetune import window_logits

    start, end = window_logits(model, eval_set.windows, device, config.eval_batch_size, config.bf16)
    predictions = predict(eval_set, start, end, replace(config.decoder, allow_null=True))
    return {qid: QuestionScore.of(prediction) for qid, prediction in predictions.items()}


def _evaluate(model: Any, dev_v1: EvalSet, dev_v2: EvalSet, config: TrainConfig, device: Any) -> tuple[dict, dict]:
    from realtime_qa.training.finetune import evaluate_model

    v1, _ = evaluate_model(model, dev_v1, config, device)
    per_question = score_v2(model, dev_v2, config, device)
    return {"v1.1": v1, "v2.0": calibrate(dev_v2.dataset, per_question)}, per_question


def self_distillation_targets(
    model: Any, positives: WindowArrays, negatives: WindowArrays, config: TrainConfig, device: Any
) -> tuple[Any, Any]:
    """Soft targets (float16 on the device) for positives + negatives in that order: the start model's logits on
    the positives; [CLS] alone (0 there, PAD_LOGIT elsewhere) on the negatives."""
    import torch
    from realtime_qa.training.finetune import PAD_LOGIT, window_logits

    start, end = window_logits(model, positives, device, config.eval_batch_size, config.bf16)
    cls_only = np.full((len(negatives), negatives.width), PAD_LOGIT, dtype=np.float32)
    cls_only[:, 0] = 0.0

    def stacked(part: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([part, cls_only]).astype(np.float16)).to(device)

    return stacked(start), stacked(end)


def teacher_distillation_targets(
    teacher: Any, positives: WindowArrays, negatives: WindowArrays, config: TrainConfig, device: Any
) -> tuple[Any, Any]:
    """Soft targets (float16 on the device) for positives + negatives in that order: the teacher's logits on all
    of them, so a negative window's target is the teacher's distribution over [CLS] (the null answer) and the
    spans, as soft as the teacher is sure."""
    import torch
    from realtime_qa.training.finetune import window_logits

    windows = WindowArrays.concatenate([positives, negatives])
    start, end = window_logits(teacher, windows, device, config.eval_batch_size, config.bf16)
    return (
        torch.from_numpy(start.astype(np.float16)).to(device),
        torch.from_numpy(end.astype(np.float16)).to(device),
    )


def load_teacher_run(config: TrainConfig, teacher_dir: Path, featurizer: Featurizer) -> tuple[Any, dict[str, Any]]:
    """The checkpoint in `teacher_dir` (the `model/` folder of the run `config.teacher`) and that run's summary;
    refused when the folder is not that run's, or when its tokenizer would read other tokens than the student's."""
    from realtime_qa.training.finetune import METRICS

    metrics = teacher_dir.parent / METRICS
    if teacher_dir.name != MODEL_DIR or not metrics.is_file():
        raise FileNotFoundError(f"{teacher_dir} is not the {MODEL_DIR}/ folder of a finished run (no {metrics})")
    summary = json.loads(metrics.read_text(encoding="utf-8"))
    if summary["config"]["name"] != config.teacher:
        raise ValueError(
            f"{teacher_dir} is run {summary['config']['name']!r}, config {config.name} wants {config.teacher!r}"
        )
    checkpoint = load_checkpoint(teacher_dir)
    if vocab_sha256(load_tokenizer(checkpoint.tokenizer_dir)) != vocab_sha256(featurizer.tokenizer):
        raise ValueError(f"the teacher in {teacher_dir} has another vocabulary than the student")
    return checkpoint, summary


def run_abstain(
    config: TrainConfig,
    paths: RunPaths,
    negatives_file: Path,
    score_start: bool = False,
    teacher_dir: Path | None = None,
) -> dict[str, Any]:
    from realtime_qa.qacore.backends.torch_network import BertForQA
    from realtime_qa.training.finetune import Distillation, StudentQA, train

    begin = time.perf_counter()
    if config.model != "student":
        raise ValueError(f"config {config.name} must train the student")
    if config.teacher and teacher_dir is None:
        raise ValueError(
            f"config {config.name} distils from run {config.teacher!r}: give its model folder (--teacher-dir)"
        )
    if teacher_dir is not None and not config.teacher:
        raise ValueError(f"config {config.name} names no teacher run: --teacher-dir is not used by it")
    device = _device()
    positives, stats, dev_v1 = _data(config, paths)
    featurizer = Featurizer(load_tokenizer(paths.base_dir), config.featurizer)
    kinds = config.negative_kinds or HARD_KINDS
    examples = read_examples(negatives_file, kinds)
    negatives, negative_stats = example_windows(examples, featurizer)
    per_kind = {kind: sum(example.kind == kind for example in examples) for kind in kinds}
    dev_v2 = build_eval_set(read_dataset(paths.squad_dir / DEV_V2_FILE), featurizer)
    log.info("%d negative windows of %s (%s)", len(negatives), per_kind, negative_stats)
    checkpoint = load_checkpoint(paths.base_dir)  # a trained QA model: a bare encoder (no span head) is refused
    net = BertForQA(checkpoint.config, dropout=config.dropout)
    net.load_weights(checkpoint.weights)
    model = StudentQA(net).to(device)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    start_scores = None
    if score_start:
        start_scores, start_v2 = _evaluate(model, dev_v1, dev_v2, config, device)
        write_scores(paths.run_dir / START_V2_SCORES, start_v2)
        log.info("start model %s: %s", paths.base_dir, start_scores)
    distillation = None
    teacher: dict[str, Any] | None = None
    if config.distills and teacher_dir is not None:
        teacher_checkpoint, teacher_summary = load_teacher_run(config, teacher_dir, featurizer)
        teacher_net = BertForQA(teacher_checkpoint.config)
        teacher_net.load_weights(teacher_checkpoint.weights)
        teacher_start, teacher_end = teacher_distillation_targets(
            StudentQA(teacher_net).to(device), positives, negatives, config, device
        )
        del teacher_net
        teacher = {
            "run": config.teacher,
            "model_sha256": teacher_checkpoint.source_sha256,
            "start_model_sha256": teacher_summary.get("start_model_sha256"),
            "config": teacher_summary["config"],
            "train_seconds": teacher_summary.get("train_seconds"),
            "tuned": teacher_summary.get("tuned"),
        }
        distillation = Distillation(teacher_start, teacher_end, config.distill_alpha, config.distill_temperature)
    elif config.distills:
        teacher_start, teacher_end = self_distillation_targets(model, positives, negatives, config, device)
        distillation = Distillation(teacher_start, teacher_end, config.distill_alpha, config.distill_temperature)
    windows = WindowArrays.concatenate([positives, negatives])
    summary = train(model, config, windows, None, paths.run_dir, device, distillation, save_checkpoints=False)
    weights = {name: value.detach().float().cpu().numpy() for name, value in net.state_dict().items()}
    summary.update(
        start_model=str(paths.base_dir),
        start_model_sha256=checkpoint.source_sha256,
        start=start_scores,
        teacher=teacher,
        positive_windows=len(positives),
        negative_windows=len(negatives),
        negative_examples=per_kind,
        negatives=asdict(negative_stats),
        train_questions=stats.questions,
    )
    return score_and_export(weights, checkpoint.config, paths, dev_v1, dev_v2, config, device, summary, begin)


def score_and_export(
    weights: dict[str, np.ndarray],
    model_config: Any,
    paths: RunPaths,
    dev_v1: EvalSet,
    dev_v2: EvalSet,
    config: TrainConfig,
    device: Any,
    summary: dict[str, Any],
    begin: float,
) -> dict[str, Any]:
    """Score the float16-rounded `weights` (what would ship) on v1.1 dev and both halves of v2.0 dev, then write
    the run's metrics.json (`summary` + `tuned`), per-question v2.0 scores, `model/` and its `export/` parts."""
    from realtime_qa.qacore.backends.torch_network import BertForQA
    from realtime_qa.training.finetune import METRICS, StudentQA

    rounded = {name: value.astype(np.float16).astype(np.float32) for name, value in weights.items()}
    rounded_net = BertForQA(model_config)
    rounded_net.load_weights(rounded)
    tuned, tuned_v2 = _evaluate(StudentQA(rounded_net).to(device), dev_v1, dev_v2, config, device)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    write_scores(paths.run_dir / V2_SCORES, tuned_v2)
    log.info("tuned (float16): %s", tuned)
    summary.update(tuned=tuned, wall_seconds=time.perf_counter() - begin)
    (paths.run_dir / METRICS).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    model_dir = paths.run_dir / MODEL_DIR
    if model_dir.exists():
        shutil.rmtree(model_dir)
    card = f"# minilm-l6-squad tuned to abstain ({config.name})\n\nThe model card is written by `qa-train ship`.\n"
    save_hf_model(model_dir, model_config, weights, paths.base_dir, model_card=card)
    pack_export(model_dir, paths.run_dir / EXPORT_DIR)
    return summary
