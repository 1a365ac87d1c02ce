"""What each `qa-train` command does: a student run (plain or distilled), a teacher run, export and shipping."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from realtime_qa.builder.checkpoint import load_checkpoint
from realtime_qa.builder.hf_export import save_hf_model
from realtime_qa.qacore.errors import CheckpointError
from realtime_qa.qacore.features import Featurizer
from realtime_qa.qacore.squad import read_dataset
from realtime_qa.qacore.tokenization import load_tokenizer
from realtime_qa.training.config import TrainConfig
from realtime_qa.training.data import EvalSet, TrainStats, WindowArrays, build_eval_set, cached_train_windows
from realtime_qa.training.model_card import render_model_card

log = logging.getLogger(__name__)

TRAIN_FILE = "train-v1.1.json.gz"
DEV_FILE = "dev-v1.1.json.gz"
DEV_V2_FILE = "dev-v2.0.json.gz"
MODEL_DIR = "model"
EXPORT_DIR = "export"
EXPORT_MANIFEST = "export.json"
PART_BYTES = 15 * 1024 * 1024  # a device call brings back files of at most 16 MiB


@dataclass(frozen=True)
class RunPaths:
    squad_dir: Path  # holds train-v1.1.json.gz and dev-v1.1.json.gz
    base_dir: Path  # the student's base encoder (config.json, model.safetensors, tokenizer)
    cache_dir: Path  # featurized training windows
    run_dir: Path  # checkpoint, logs, metrics, the exported model


def _device() -> Any:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _data(config: TrainConfig, paths: RunPaths) -> tuple[WindowArrays, TrainStats, EvalSet]:
    windows, stats = cached_train_windows(
        paths.squad_dir / TRAIN_FILE, paths.base_dir, config.featurizer, paths.cache_dir
    )
    featurizer = Featurizer(load_tokenizer(paths.base_dir), config.featurizer)
    eval_set = build_eval_set(read_dataset(paths.squad_dir / DEV_FILE), featurizer)
    log.info("%d training windows (%s), %d dev questions", len(windows), stats, len(eval_set))
    return windows, stats, eval_set


def run_student(config: TrainConfig, paths: RunPaths, teacher_run: Path | None = None) -> dict[str, Any]:
    """Fine-tune (or distil into) the student, score its float16 export on dev, write model/ and export/."""
    from realtime_qa.qacore.backends.torch_network import BertForQA
    from realtime_qa.training.distill import load_teacher_logits
    from realtime_qa.training.finetune import METRICS, Distillation, StudentQA, evaluate_model, train

    begin = time.perf_counter()
    if config.model != "student":
        raise ValueError(f"config {config.name} trains a {config.model}, not the student")
    if config.distills and teacher_run is None:
        raise ValueError(f"config {config.name} distils (alpha {config.distill_alpha} < 1): give the teacher run")
    device = _device()
    windows, stats, eval_set = _data(config, paths)
    checkpoint = load_checkpoint(paths.base_dir, init_qa_head_seed=config.seed)
    net = BertForQA(checkpoint.config, dropout=config.dropout)
    net.load_weights(checkpoint.weights)
    distillation = None
    teacher_summary = None
    if config.distills and teacher_run is not None:
        teacher_start, teacher_end = load_teacher_logits(teacher_run, windows, device)
        distillation = Distillation(teacher_start, teacher_end, config.distill_alpha, config.distill_temperature)
        teacher_summary = json.loads((teacher_run / METRICS).read_text(encoding="utf-8"))
    summary = train(StudentQA(net), config, windows, eval_set, paths.run_dir, device, distillation)
    # Score exactly what ships: the weights rounded to float16.
    weights = {name: value.detach().float().cpu().numpy() for name, value in net.state_dict().items()}
    shipped = {name: value.astype(np.float16).astype(np.float32) for name, value in weights.items()}
    shipped_net = BertForQA(checkpoint.config)
    shipped_net.load_weights(shipped)
    scores, _ = evaluate_model(StudentQA(shipped_net).to(device), eval_set, config, device)
    summary.update(final=scores, train_questions=stats.questions, wall_seconds=time.perf_counter() - begin)
    card = render_model_card(summary, teacher_summary)
    model_dir = paths.run_dir / MODEL_DIR
    if model_dir.exists():
        shutil.rmtree(model_dir)
    save_hf_model(model_dir, checkpoint.config, weights, paths.base_dir, model_card=card)
    reloaded = load_checkpoint(model_dir)
    if any(not np.array_equal(reloaded.weights[name], shipped[name]) for name in shipped):
        raise CheckpointError(f"the exported model in {model_dir} does not hold the trained weights")
    (paths.run_dir / METRICS).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    pack_export(model_dir, paths.run_dir / EXPORT_DIR)
    log.info("%s: dev EM %.2f F1 %.2f (float16 export)", config.name, scores["exact_match"], scores["f1"])
    return summary


def run_negatives(config: TrainConfig, paths: RunPaths) -> dict[str, Any]:
    """Tune a trained QA model (`paths.base_dir`, e.g. the shipped one) on SQuAD v1.1 windows plus synthetic
    unanswerable questions (training/negatives.py), plain cross-entropy; score the model it started from and the
    float16 result on SQuAD v1.1 dev (never abstaining) and v2.0 dev (abstaining) in the same process."""
    from realtime_qa.qacore.backends.torch_network import BertForQA
    from realtime_qa.training.finetune import METRICS, StudentQA, evaluate_model, evaluate_model_v2, train
    from realtime_qa.training.negatives import negative_windows

    begin = time.perf_counter()
    if config.model != "student" or config.distills or config.negatives_per_question <= 0:
        raise ValueError(f"config {config.name} must train the student without a teacher and with negatives")
    device = _device()
    positives, stats, dev_v1 = _data(config, paths)
    featurizer = Featurizer(load_tokenizer(paths.base_dir), config.featurizer)
    negatives, negative_stats = negative_windows(
        read_dataset(paths.squad_dir / TRAIN_FILE).articles,
        featurizer,
        config.negatives_per_question,
        config.negative_source,
        config.seed,
    )
    dev_v2 = build_eval_set(read_dataset(paths.squad_dir / DEV_V2_FILE), featurizer)
    log.info("%d negative windows (%s), %d v2.0 dev questions", len(negatives), negative_stats, len(dev_v2))
    checkpoint = load_checkpoint(paths.base_dir)  # a trained QA model: a bare encoder (no span head) is refused
    net = BertForQA(checkpoint.config, dropout=config.dropout)
    net.load_weights(checkpoint.weights)

    def score(model: Any) -> dict[str, dict[str, float]]:
        v1, _ = evaluate_model(model, dev_v1, config, device)
        return {"v1.1": v1, "v2.0": evaluate_model_v2(model, dev_v2, config, device)}

    model = StudentQA(net).to(device)
    baseline = score(model)
    log.info("start model %s: %s", paths.base_dir, baseline)
    windows = WindowArrays.concatenate([positives, negatives])
    summary = train(model, config, windows, None, paths.run_dir, device, save_checkpoints=False)
    weights = {name: value.detach().float().cpu().numpy() for name, value in net.state_dict().items()}
    rounded = {name: value.astype(np.float16).astype(np.float32) for name, value in weights.items()}
    rounded_net = BertForQA(checkpoint.config)
    rounded_net.load_weights(rounded)
    tuned = score(StudentQA(rounded_net).to(device))
    log.info("tuned (float16): %s", tuned)
    summary.update(
        start_model=str(paths.base_dir),
        start_model_sha256=checkpoint.source_sha256,
        baseline=baseline,
        tuned=tuned,
        positive_windows=len(positives),
        negative_windows=len(negatives),
        negatives=asdict(negative_stats),
        train_questions=stats.questions,
        wall_seconds=time.perf_counter() - begin,
    )
    (paths.run_dir / METRICS).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    model_dir = paths.run_dir / MODEL_DIR
    if model_dir.exists():
        shutil.rmtree(model_dir)
    card = (
        f"# minilm-l6-squad + synthetic negatives ({config.name})\n\nAn experiment, not the shipped model: "
        f"{paths.base_dir} tuned on SQuAD v1.1 plus synthetic unanswerable questions (training/negatives.py).\n"
        f"Start model: {json.dumps(baseline)}\nThese float16 weights: {json.dumps(tuned)}\n"
    )
    save_hf_model(model_dir, checkpoint.config, weights, paths.base_dir, model_card=card)
    pack_export(model_dir, paths.run_dir / EXPORT_DIR)
    return summary


def run_teacher(config: TrainConfig, paths: RunPaths, piece_dirs: list[Path]) -> dict[str, Any]:
    """Fine-tune the MPNet teacher on the student's windows, score it, and save its logits on every training window."""
    from realtime_qa.training.distill import save_teacher_logits
    from realtime_qa.training.finetune import METRICS, train, window_logits
    from realtime_qa.training.teacher import load_teacher, verify_pieces

    begin = time.perf_counter()
    if config.model != "teacher":
        raise ValueError(f"config {config.name} trains a {config.model}, not the teacher")
    verify_pieces(piece_dirs)
    device = _device()
    windows, stats, eval_set = _data(config, paths)
    featurizer = Featurizer(load_tokenizer(paths.base_dir), config.featurizer)
    teacher = load_teacher(piece_dirs, featurizer.special, config.seed, config.dropout)
    summary = train(teacher, config, windows, eval_set, paths.run_dir, device)
    last = summary["history"][-1]
    summary["final"] = {"exact_match": last["exact_match"], "f1": last["f1"]}
    logits_begin = time.perf_counter()
    start, end = window_logits(teacher, windows, device, config.eval_batch_size, config.bf16)
    save_teacher_logits(paths.run_dir, start, end, windows)
    summary.update(
        logits_seconds=time.perf_counter() - logits_begin,
        train_questions=stats.questions,
        wall_seconds=time.perf_counter() - begin,
    )
    (paths.run_dir / METRICS).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def pack_export(model_dir: Path, export_dir: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """The model directory as one tar cut into parts small enough to come back from the device machine."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for file in sorted(model_dir.iterdir()):
            tar.add(file, arcname=file.name)
    data = buffer.getvalue()
    if export_dir.exists():
        shutil.rmtree(export_dir)
    export_dir.mkdir(parents=True)
    parts = []
    for number, offset in enumerate(range(0, len(data), part_bytes)):
        part = export_dir / f"model.tar.part{number:02d}"
        part.write_bytes(data[offset : offset + part_bytes])
        parts.append(part)
    manifest = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "parts": [p.name for p in parts]}
    (export_dir / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return parts


def ship(export_dir: Path, out_dir: Path) -> list[Path]:
    """Reassemble an export (parts + export.json) and replace the files of `out_dir` with the model it holds."""
    manifest_path = export_dir / EXPORT_MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"no {EXPORT_MANIFEST} in {export_dir}")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    data = b"".join((export_dir / name).read_bytes() for name in manifest["parts"])
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise CheckpointError(f"the parts in {export_dir} do not reassemble to the exported model")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Staged inside out_dir, so a half-written model never sits beside it (where git would see it).
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".staging-") as staging_name:
        staging = Path(staging_name)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            tar.extractall(staging, filter="data")
        load_checkpoint(staging)  # refuses anything incomplete before the shipped model is touched
        incoming = {file.name for file in staging.iterdir()}
        for old in out_dir.iterdir():
            # Replace the model's own files (and shards of the old one); keep files others add (calibration).
            if old.is_file() and (old.name in incoming or old.name.startswith("model")):
                old.unlink()
        shipped = []
        for file in sorted(staging.iterdir()):
            shipped.append(Path(shutil.move(str(file), out_dir / file.name)))
    return shipped
