"""Distilling the teacher's span distributions into the student.

loss = alpha * CE(gold start/end) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T)),
averaged over the start and end distributions (Hinton et al.; the T^2 keeps the soft term's gradients
at the scale of the hard one). The teacher's logits are computed once over the training windows
(`dump_teacher_logits`) and read back, checked against the windows they were computed on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from realtime_qa.training.data import WindowArrays

TEACHER_LOGITS = "teacher_logits.npy"  # (2, windows, width) float16: start, end
TEACHER_LOGITS_META = "teacher_logits.json"


def distillation_loss(
    start: torch.Tensor,
    end: torch.Tensor,
    teacher_start: torch.Tensor,
    teacher_end: torch.Tensor,
    start_positions: torch.Tensor,
    end_positions: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """All logits (batch, width) float32 with padding already masked to a large negative value."""
    hard = (F.cross_entropy(start, start_positions) + F.cross_entropy(end, end_positions)) / 2
    soft = (_soft_kl(start, teacher_start, temperature) + _soft_kl(end, teacher_end, temperature)) / 2
    return alpha * hard + (1.0 - alpha) * temperature**2 * soft


def _soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )


def windows_fingerprint(windows: WindowArrays) -> str:
    """A hash of the windows' ids and lengths: teacher logits are only valid for the exact same windows."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(windows.input_ids).tobytes())
    digest.update(np.ascontiguousarray(windows.lengths).tobytes())
    return digest.hexdigest()


def save_teacher_logits(run_dir: Path, start: np.ndarray, end: np.ndarray, windows: WindowArrays) -> Path:
    path = run_dir / TEACHER_LOGITS
    np.save(path, np.stack([start, end]).astype(np.float16))
    meta = {"windows": len(windows), "width": windows.width, "fingerprint": windows_fingerprint(windows)}
    (run_dir / TEACHER_LOGITS_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path


def load_teacher_logits(
    teacher_run_dir: Path, windows: WindowArrays, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    meta_path = teacher_run_dir / TEACHER_LOGITS_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"no teacher logits in {teacher_run_dir} (run `qa-train teacher` first)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta["fingerprint"] != windows_fingerprint(windows):
        raise ValueError(f"teacher logits in {teacher_run_dir} were computed on other training windows")
    logits = torch.from_numpy(np.load(teacher_run_dir / TEACHER_LOGITS)).to(device)
    return logits[0], logits[1]
