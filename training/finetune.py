"""The training loop shared by the student, the distilled student and the teacher.

Every window of the training set lives on the GPU; a batch is a gather of rows trimmed to its longest
window. AdamW with linear warm-up and decay, bf16 autocast, gradient clipping, a fixed seed. After each
epoch the model answers the whole dev set (decoded with `qacore.decoding.decode`, scored with
`qacore.squad_metric.evaluate_v1`) and the run is checkpointed, so a call cut short resumes at the last
finished epoch. The loss curve and the per-epoch scores go to `train_log.jsonl` and `metrics.json`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from realtime_qa.qacore.squad_metric import evaluate_v1, evaluate_v2
from realtime_qa.training.config import TrainConfig
from realtime_qa.training.data import EvalSet, WindowArrays, predict, predict_texts
from torch import nn

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
TRAIN_LOG = "train_log.jsonl"
METRICS = "metrics.json"
PREDICTIONS = "dev_predictions.json"
MEGA_BATCHES = 50  # group_by_length sorts within runs of this many batches, keeping the order random
PAD_LOGIT = -1.0e4  # logits of padding positions: no probability, yet finite (KL stays defined)

# (input_ids, lengths, context_offsets) -> (start_logits, end_logits), both (batch, width)
SpanModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class StudentQA(nn.Module):
    """`BertForQA` fed from compact windows: segment ids and attention mask derived on the GPU."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, input_ids: torch.Tensor, lengths: torch.Tensor, context_offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        mask = positions < lengths[:, None]
        segments = (positions >= context_offsets[:, None]) & mask
        start, end = self.net(input_ids.long(), segments.long(), mask.long())
        return start, end


@dataclass
class DeviceWindows:
    """WindowArrays as GPU tensors (ids int32), plus the lengths on the host for batch planning."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    context_offsets: torch.Tensor
    start_positions: torch.Tensor
    end_positions: torch.Tensor
    host_lengths: np.ndarray

    @classmethod
    def of(cls, windows: WindowArrays, device: torch.device) -> DeviceWindows:
        def put(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(device)

        return cls(
            put(windows.input_ids),
            put(windows.lengths),
            put(windows.context_offsets),
            put(windows.start_positions).long(),
            put(windows.end_positions).long(),
            windows.lengths.copy(),
        )

    def __len__(self) -> int:
        return int(self.host_lengths.shape[0])


@dataclass
class Batch:
    rows: torch.Tensor
    input_ids: torch.Tensor
    lengths: torch.Tensor
    context_offsets: torch.Tensor
    start_positions: torch.Tensor
    end_positions: torch.Tensor


def batch_plan(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[np.ndarray]:
    """Row indices of each batch of one epoch: a seeded shuffle, optionally grouped by window length."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(lengths.shape[0])
    if group_by_length:
        span = batch_size * MEGA_BATCHES
        chunks = [order[i : i + span] for i in range(0, order.shape[0], span)]
        order = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")] for chunk in chunks])
    batches = [order[i : i + batch_size] for i in range(0, order.shape[0], batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def iterate_batches(windows: DeviceWindows, plan: list[np.ndarray]) -> Iterator[Batch]:
    device = windows.input_ids.device
    for rows_np in plan:
        width = int(windows.host_lengths[rows_np].max())
        rows = torch.from_numpy(rows_np).to(device, non_blocking=True)
        yield Batch(
            rows=rows,
            input_ids=windows.input_ids[rows, :width],
            lengths=windows.lengths[rows],
            context_offsets=windows.context_offsets[rows],
            start_positions=windows.start_positions[rows],
            end_positions=windows.end_positions[rows],
        )


def mask_padding(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(logits.shape[1], device=logits.device)[None, :]
    return logits.float().masked_fill(positions >= lengths[:, None], PAD_LOGIT)


def span_cross_entropy(start: torch.Tensor, end: torch.Tensor, batch: Batch) -> torch.Tensor:
    return (F.cross_entropy(start, batch.start_positions) + F.cross_entropy(end, batch.end_positions)) / 2


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases and LayerNorm weights (1-d parameters) are not decayed."""
    decayed = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    plain = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


@torch.no_grad()
def window_logits(
    model: nn.Module, windows: WindowArrays, device: torch.device, batch_size: int, bf16: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Start and end logits (float32, windows x width) of every window; padding positions hold PAD_LOGIT."""
    was_training = model.training
    model.eval()
    on_device = DeviceWindows.of(windows, device)
    order = np.argsort(-windows.lengths, kind="stable")
    plan = [order[i : i + batch_size] for i in range(0, order.shape[0], batch_size)]
    start_out = np.full((len(windows), windows.width), PAD_LOGIT, dtype=np.float32)
    end_out = np.full_like(start_out, PAD_LOGIT)
    for rows_np, batch in zip(plan, iterate_batches(on_device, plan), strict=True):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            start, end = model(batch.input_ids, batch.lengths, batch.context_offsets)
        width = batch.input_ids.shape[1]
        start_out[rows_np, :width] = mask_padding(start, batch.lengths).cpu().numpy()
        end_out[rows_np, :width] = mask_padding(end, batch.lengths).cpu().numpy()
    model.train(was_training)
    return start_out, end_out


def evaluate_model(
    model: nn.Module, eval_set: EvalSet, config: TrainConfig, device: torch.device
) -> tuple[dict[str, float], dict[str, str]]:
    start, end = window_logits(model, eval_set.windows, device, config.eval_batch_size, config.bf16)
    predictions = predict_texts(eval_set, start, end, config.decoder)
    scores = evaluate_v1(eval_set.dataset, predictions)
    return {"exact_match": float(scores["exact_match"]), "f1": float(scores["f1"])}, predictions


def evaluate_model_v2(
    model: nn.Module, eval_set: EvalSet, config: TrainConfig, device: torch.device
) -> dict[str, float]:
    """SQuAD v2.0 scores as `qa-eval` computes them: the decoder may abstain (`allow_null`, threshold 0) and each
    question's null probability is its no-answer probability (for best_exact/best_f1 and their thresholds)."""
    start, end = window_logits(model, eval_set.windows, device, config.eval_batch_size, config.bf16)
    predictions = predict(eval_set, start, end, replace(config.decoder, allow_null=True))
    texts = {qid: prediction.text for qid, prediction in predictions.items()}
    na_probs = {qid: prediction.null_probability for qid, prediction in predictions.items()}
    scores = evaluate_v2(eval_set.dataset, texts, na_probs)
    return {key: float(value) for key, value in scores.values.items()}


@dataclass
class Distillation:
    """Precomputed teacher logits (windows x width, fp16 on the GPU), aligned with the training windows."""

    start: torch.Tensor
    end: torch.Tensor
    alpha: float
    temperature: float

    def loss(self, start: torch.Tensor, end: torch.Tensor, batch: Batch) -> torch.Tensor:
        from realtime_qa.training.distill import distillation_loss

        width = start.shape[1]
        teacher_start = mask_padding(self.start[batch.rows, :width], batch.lengths)
        teacher_end = mask_padding(self.end[batch.rows, :width], batch.lengths)
        return distillation_loss(
            start, end, teacher_start, teacher_end, batch.start_positions, batch.end_positions,
            self.alpha, self.temperature,
        )  # fmt: skip


@dataclass
class RunLog:
    run_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)

    def write(self, entry: dict[str, Any]) -> None:
        with (self.run_dir / TRAIN_LOG).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")


def train(
    model: nn.Module,
    config: TrainConfig,
    windows: WindowArrays,
    eval_set: EvalSet | None,
    run_dir: Path,
    device: torch.device,
    distillation: Distillation | None = None,
    max_steps: int | None = None,
    save_checkpoints: bool = True,
) -> dict[str, Any]:
    """Train `model` (a SpanModel) in place and return the run summary (also written to metrics.json).

    Resumes from run_dir/checkpoint.pt when it exists; with `save_checkpoints` one is written after every epoch.
    `max_steps` stops early (for tests).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model.to(device).train()
    on_device = DeviceWindows.of(windows, device)
    steps_per_epoch = math.ceil(len(on_device) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=config.learning_rate,
        eps=config.adam_eps,
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(int(config.warmup_ratio * total_steps), total_steps)
    )
    run_log = RunLog(run_dir)
    summary: dict[str, Any] = {
        "config": config.to_dict(),
        "train_windows": len(on_device),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "history": [],
        "train_seconds": 0.0,
    }
    start_epoch = 0
    checkpoint_path = run_dir / CHECKPOINT
    if checkpoint_path.is_file():
        saved = torch.load(checkpoint_path, map_location=device, weights_only=False)
        if saved["config"] != config.to_dict():
            raise ValueError(f"{checkpoint_path} was written by another config; use a fresh run directory")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        summary = saved["summary"]
        start_epoch = saved["epoch"]
        log.info("resumed %s at epoch %d", run_dir, start_epoch)
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, config.epochs):
        epoch_begin = time.perf_counter()
        plan = batch_plan(on_device.host_lengths, config.batch_size, config.seed, epoch, config.group_by_length)
        running = torch.zeros((), device=device)
        counted = 0
        for batch in iterate_batches(on_device, plan):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                start, end = model(batch.input_ids, batch.lengths, batch.context_offsets)
            start, end = mask_padding(start, batch.lengths), mask_padding(end, batch.lengths)
            if distillation is not None:
                loss = distillation.loss(start, end, batch)
            else:
                loss = span_cross_entropy(start, end, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            running += loss.detach()
            counted += 1
            if step % config.log_every == 0:
                mean = float(running.item()) / counted
                run_log.write(
                    {"kind": "loss", "epoch": epoch + 1, "step": step, "loss": round(mean, 5),
                     "lr": scheduler.get_last_lr()[0],
                     "epoch_seconds": round(time.perf_counter() - epoch_begin, 1)}
                )  # fmt: skip
                log.info("epoch %d step %d/%d loss %.4f", epoch + 1, step, total_steps, mean)
                running.zero_()
                counted = 0
            if max_steps is not None and step >= max_steps:
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - epoch_begin
        summary["train_seconds"] += train_seconds
        entry: dict[str, Any] = {
            "kind": "epoch",
            "epoch": epoch + 1,
            "step": step,
            "train_seconds": round(train_seconds, 1),
        }
        if eval_set is not None:
            eval_begin = time.perf_counter()
            scores, predictions = evaluate_model(model, eval_set, config, device)
            entry.update(scores, eval_seconds=round(time.perf_counter() - eval_begin, 1))
            (run_dir / PREDICTIONS).write_text(json.dumps(predictions, ensure_ascii=False) + "\n", encoding="utf-8")
            log.info("epoch %d dev EM %.2f F1 %.2f", epoch + 1, scores["exact_match"], scores["f1"])
        run_log.write(entry)
        summary["history"].append(entry)
        summary["steps"] = step
        (run_dir / METRICS).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if max_steps is not None and step >= max_steps:
            break
        if not save_checkpoints:
            continue
        torch.save(
            {
                "config": config.to_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "summary": summary,
            },
            checkpoint_path,
        )
    return summary
