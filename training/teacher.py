"""The MPNet teacher (all-mpnet-base-v2, 12x768) reading the student's own windows.

MPNet's vocabulary is BERT's uncased WordPiece vocabulary with every id shifted by 4, behind the specials
<s>=0 <pad>=1 </s>=2 <unk>=3 (and <mask> appended), and both tokenizers normalise text the same way (BERT
normaliser, lowercase, accents stripped). So the teacher needs no featurization of its own: a student
window `[CLS] q [SEP] p [SEP]` becomes `<s> q </s></s> p </s>` by shifting ids and inserting one `</s>`
at the first passage position, and teacher position j reads student position j before that insertion
and j - 1 after it. The teacher's logits therefore line up one-to-one with the student's window positions.

The teacher's weights (fp16, about 218 MB) travel to the GPU machine in pieces of at most ~60 MB, one
piece folder per device call (`pack_teacher`); `load_teacher` reads all piece folders back.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from realtime_qa.qacore.features import SpecialTokens
from torch import nn

MPNET_ID_SHIFT = 4
MPNET_BOS, MPNET_PAD, MPNET_EOS = 0, 1, 2
TEACHER_CONFIG = "config.json"
PIECE_PATTERN = "teacher-*.safetensors"
# Weights the QA teacher does not use: the sentence-transformers pooler and the (non-persistent) position ids.
_DROPPED = ("pooler.", "embeddings.position_ids")


def teacher_input_ids(
    input_ids: torch.Tensor, lengths: torch.Tensor, context_offsets: torch.Tensor, special: SpecialTokens
) -> tuple[torch.Tensor, torch.Tensor]:
    """MPNet ids (batch, width + 1) and attention mask for student windows (batch, width)."""
    batch, width = input_ids.shape
    positions = torch.arange(width + 1, device=input_ids.device)[None, :].expand(batch, -1)
    offsets = context_offsets[:, None].long()
    source = (positions - (positions > offsets).long()).clamp(max=width - 1)
    student = input_ids.long().gather(1, source)
    ids = student + MPNET_ID_SHIFT
    ids = torch.where(student == special.cls_id, MPNET_BOS, ids)
    ids = torch.where(student == special.sep_id, MPNET_EOS, ids)
    ids = torch.where(positions == offsets, MPNET_EOS, ids)
    mask = positions < (lengths[:, None].long() + 1)
    ids = torch.where(mask, ids, MPNET_PAD)
    return ids, mask.long()


def student_positions(logits: torch.Tensor, context_offsets: torch.Tensor) -> torch.Tensor:
    """Teacher logits (batch, width + 1) at the student's positions (batch, width)."""
    width = logits.shape[1] - 1
    positions = torch.arange(width, device=logits.device)[None, :]
    source = positions + (positions >= context_offsets[:, None].long()).long()
    return logits.gather(1, source)


class TeacherQA(nn.Module):
    """MPNetForQuestionAnswering behind the student's interface: student windows in, student-aligned logits out."""

    def __init__(self, mpnet_qa: nn.Module, special: SpecialTokens) -> None:
        super().__init__()
        self.mpnet_qa = mpnet_qa
        self.special = special

    def forward(
        self, input_ids: torch.Tensor, lengths: torch.Tensor, context_offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = teacher_input_ids(input_ids, lengths, context_offsets, self.special)
        out = self.mpnet_qa(input_ids=ids, attention_mask=mask)
        return (
            student_positions(out.start_logits.float(), context_offsets),
            student_positions(out.end_logits.float(), context_offsets),
        )


def load_teacher(piece_dirs: list[Path], special: SpecialTokens, head_seed: int, dropout: float) -> TeacherQA:
    """MPNetForQuestionAnswering from the packed pieces, float32, with a fresh span head drawn from `head_seed`."""
    from safetensors.torch import load_file
    from transformers import MPNetConfig, MPNetForQuestionAnswering

    config_files = [d / TEACHER_CONFIG for d in piece_dirs if (d / TEACHER_CONFIG).is_file()]
    if not config_files:
        raise FileNotFoundError(f"no {TEACHER_CONFIG} among the teacher pieces {piece_dirs}")
    raw = json.loads(config_files[0].read_text(encoding="utf-8"))
    raw.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, num_labels=2)
    config = MPNetConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")})
    model = MPNetForQuestionAnswering(config)
    state: dict[str, torch.Tensor] = {}
    for piece in sorted(f for d in piece_dirs for f in d.glob(PIECE_PATTERN)):
        state.update({"mpnet." + name: tensor.float() for name, tensor in load_file(str(piece)).items()})
    generator = torch.Generator().manual_seed(head_seed)
    state["qa_outputs.weight"] = torch.randn(2, config.hidden_size, generator=generator) * 0.02
    state["qa_outputs.bias"] = torch.zeros(2)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(
            f"teacher weights do not fit MPNetForQuestionAnswering: missing {missing}, unexpected {unexpected}"
        )
    return TeacherQA(model, special)


def pack_teacher(source_dir: Path, out_dir: Path, piece_bytes: int) -> list[Path]:
    """Write the teacher's weights as fp16 safetensors in piece folders out_dir/p1, p2, ... of <= piece_bytes each.

    Each folder is carried by one device call; p1 also holds the MPNet config and a manifest of every piece.
    """
    from safetensors.numpy import load_file, save_file

    weights = {
        name: np.ascontiguousarray(value, dtype=np.float16)
        for name, value in load_file(str(source_dir / "model.safetensors")).items()
        if not name.startswith(_DROPPED)
    }
    groups: list[list[str]] = [[]]
    size = 0
    for name in sorted(weights, key=_layer_order):
        nbytes = weights[name].nbytes
        if groups[-1] and size + nbytes > piece_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if out_dir.exists():
        shutil.rmtree(out_dir)
    manifest: dict[str, Any] = {"source": str(source_dir), "pieces": {}}
    folders = []
    for number, names in enumerate(groups, start=1):
        folder = out_dir / f"p{number}"
        folder.mkdir(parents=True)
        file = folder / f"teacher-{number:02d}.safetensors"
        save_file({name: weights[name] for name in names}, str(file))
        manifest["pieces"][file.name] = {
            "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
            "tensors": len(names),
            "bytes": file.stat().st_size,
        }
        folders.append(folder)
    shutil.copyfile(source_dir / "config.json", folders[0] / TEACHER_CONFIG)
    (folders[0] / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return folders


def verify_pieces(piece_dirs: list[Path]) -> None:
    """Raise when a piece named in the manifest is missing or differs from what was packed."""
    manifests = [d / "manifest.json" for d in piece_dirs if (d / "manifest.json").is_file()]
    if not manifests:
        raise FileNotFoundError(f"no manifest.json among the teacher pieces {piece_dirs}")
    pieces = json.loads(manifests[0].read_text(encoding="utf-8"))["pieces"]
    found = {f.name: f for d in piece_dirs for f in d.glob(PIECE_PATTERN)}
    for name, entry in pieces.items():
        if name not in found:
            raise FileNotFoundError(f"teacher piece {name} is missing")
        if hashlib.sha256(found[name].read_bytes()).hexdigest() != entry["sha256"]:
            raise ValueError(f"teacher piece {name} does not match its manifest")


def _layer_order(name: str) -> tuple[int, str]:
    """Embeddings first, then layers in numeric order, so each piece is a run of consecutive layers."""
    if name.startswith("encoder.layer."):
        return int(name.split(".")[2]) + 1, name
    return (0 if name.startswith("embeddings.") else 1000), name
