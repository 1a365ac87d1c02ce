"""Distilling the null logit from a teacher trained with the same negatives (`qa-train abstain --teacher-dir`), and
the exact weight delta that carries the start model to the GPU machine. CPU, tiny random BERTs, the shipped
tokenizer and real SQuAD v1.1 train questions."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from realtime_qa.qacore.config import ModelConfig
from realtime_qa.qacore.errors import InvalidInputError
from realtime_qa.qacore.features import Featurizer, FeaturizerConfig
from realtime_qa.qacore.squad import read_dataset
from realtime_qa.qacore.tokenization import load_tokenizer
from realtime_qa.training.config import TrainConfig
from realtime_qa.training.data import WindowArrays, train_windows

if TYPE_CHECKING:
    from torch import Tensor

torch = pytest.importorskip("torch")

TINY = ModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def tiny_weights(seed: int) -> dict[str, np.ndarray]:
    from realtime_qa.builder.model_weights import expected_shapes

    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_shapes(TINY).items():
        if name.endswith("LayerNorm.weight"):
            weights[name] = np.ones(shape, np.float32)
        elif name.endswith("LayerNorm.bias"):
            weights[name] = np.zeros(shape, np.float32)
        else:
            weights[name] = rng.normal(0.0, 0.5 if name.startswith("qa_outputs") else 0.05, shape).astype(np.float32)
    return weights


def save_run(run_dir: Path, name: str, weights: dict[str, np.ndarray], tokenizer_dir: Path) -> Path:
    """A finished `qa-train abstain` run as the teacher option reads it: RUN/metrics.json and RUN/model/."""
    from realtime_qa.builder.hf_export import save_hf_model

    save_hf_model(run_dir / "model", TINY, weights, tokenizer_dir)
    (run_dir / "metrics.json").write_text(json.dumps({"config": {"name": name}, "tuned": {"v1.1": {"f1": 1.0}}}))
    return run_dir / "model"


def span_model(model_dir: Path):
    from realtime_qa.builder.checkpoint import load_checkpoint
    from realtime_qa.qacore.backends.torch_network import BertForQA
    from realtime_qa.training.finetune import StudentQA

    checkpoint = load_checkpoint(model_dir)
    net = BertForQA(checkpoint.config)
    net.load_weights(checkpoint.weights)
    return StudentQA(net)


@pytest.fixture(scope="module")
def featurizer(shipped_model_dir: Path) -> Featurizer:
    return Featurizer(
        load_tokenizer(shipped_model_dir), FeaturizerConfig(max_seq_length=128, doc_stride=48, max_query_length=32)
    )


@pytest.fixture(scope="module")
def windows(featurizer: Featurizer, squad_dir: Path) -> tuple[WindowArrays, WindowArrays]:
    """(positives, negatives): v1.1 train windows, and negated questions of the same paragraphs (target [CLS])."""
    from realtime_qa.training.negatives import NegativeExample, example_windows

    train = read_dataset(squad_dir / "train-v1.1.json.gz").head(40)
    positives, _ = train_windows(train.head(1).articles, featurizer)
    examples = [
        NegativeExample("negation", question.id, question.question.replace(" is ", " is not ", 1), paragraph.context)
        for paragraph, question in list(train.questions())[:12]
    ]
    negatives, _ = example_windows(examples, featurizer)
    return positives, negatives


def test_teacher_targets_are_the_teachers_logits_on_negatives_too(
    windows: tuple[WindowArrays, WindowArrays], featurizer: Featurizer, shipped_model_dir: Path, tmp_path: Path
) -> None:
    from realtime_qa.training.abstain import (
        load_teacher_run,
        self_distillation_targets,
        teacher_distillation_targets,
    )
    from realtime_qa.training.finetune import PAD_LOGIT, window_logits

    positives, negatives = windows
    teacher_dir = save_run(tmp_path / "abstain_teacher", "abstain_teacher", tiny_weights(1), shipped_model_dir)
    config = TrainConfig("student", bf16=False, eval_batch_size=8, distill_alpha=0.5, teacher="abstain_teacher")
    _, summary = load_teacher_run(config, teacher_dir, featurizer)
    assert summary["config"]["name"] == "abstain_teacher"
    teacher = span_model(teacher_dir)
    cpu = torch.device("cpu")
    start, end = teacher_distillation_targets(teacher, positives, negatives, config, cpu)
    assert start.dtype == end.dtype == torch.float16
    assert start.shape == end.shape == (len(positives) + len(negatives), positives.width)
    for part, rows in ((positives, slice(0, len(positives))), (negatives, slice(len(positives), None))):
        expected_start, expected_end = window_logits(teacher, part, cpu, 8, False)
        np.testing.assert_allclose(start[rows].float().numpy(), expected_start, rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(end[rows].float().numpy(), expected_end, rtol=1e-2, atol=1e-2)
    # On a negative window the soft target is the teacher's distribution over [CLS] and the spans (the teacher's own
    # null logit), where self-distillation puts all of it on [CLS].
    negative_start = start[len(positives) :].float()
    inside = negative_start > PAD_LOGIT / 2
    assert (inside.sum(dim=1) == torch.from_numpy(negatives.lengths).long()).all()
    cls_share = torch.softmax(negative_start, dim=1)[:, 0]
    assert ((cls_share > 0.0) & (cls_share < 0.99)).all()
    self_start, _ = self_distillation_targets(teacher, positives, negatives, config, cpu)
    assert (torch.softmax(self_start[len(positives) :].float(), dim=1)[:, 0] == 1.0).all()


def test_distilling_moves_the_students_null_share_to_the_teachers(
    windows: tuple[WindowArrays, WindowArrays], featurizer: Featurizer, shipped_model_dir: Path, tmp_path: Path
) -> None:
    from realtime_qa.qacore.backends.torch_network import BertForQA
    from realtime_qa.training.abstain import load_teacher_run, teacher_distillation_targets
    from realtime_qa.training.finetune import Distillation, StudentQA, train, window_logits

    positives, negatives = windows
    both = WindowArrays.concatenate([positives, negatives])
    cpu = torch.device("cpu")
    teacher_config = TrainConfig(
        "teacher", epochs=8, batch_size=16, learning_rate=1e-2, warmup_ratio=0.0, dropout=0.0, bf16=False,
        group_by_length=False, eval_batch_size=16,
    )  # fmt: skip

    def null_share(model) -> Tensor:
        """Each negative window's probability of [CLS] as the answer start."""
        start, _ = window_logits(model, negatives, cpu, 16, False)
        return torch.softmax(torch.from_numpy(start), dim=1)[:, 0]

    # The teacher: a tiny BERT trained with cross-entropy on the same negatives ([CLS]) and positives.
    teacher_net = BertForQA(TINY)
    teacher_net.load_weights(tiny_weights(1))
    train(
        StudentQA(teacher_net),
        teacher_config,
        both,
        None,
        tmp_path / "t",
        cpu,
        save_checkpoints=False,
    )
    trained = {name: value.detach().numpy() for name, value in teacher_net.state_dict().items()}
    teacher_dir = save_run(tmp_path / "teacher", "teacher", trained, shipped_model_dir)
    config = replace(teacher_config, name="student", distill_alpha=0.0, distill_temperature=1.0, teacher="teacher")
    teacher = span_model(load_teacher_run(config, teacher_dir, featurizer)[0].model_dir)
    teacher_share = null_share(teacher)
    assert 0.3 < float(teacher_share.mean()) < 0.999  # it learnt to abstain, and its target is still soft

    student = span_model(save_run(tmp_path / "start", "start", tiny_weights(2), shipped_model_dir))
    gap_before = float((null_share(student) - teacher_share).abs().mean())
    target_start, target_end = teacher_distillation_targets(teacher, positives, negatives, config, cpu)
    distillation = Distillation(target_start, target_end, config.distill_alpha, config.distill_temperature)
    train(student, config, both, None, tmp_path / "run", cpu, distillation, save_checkpoints=False)
    gap_after = float((null_share(student) - teacher_share).abs().mean())
    assert gap_before > 0.25 and gap_after < 0.3 * gap_before


def test_teacher_run_must_be_the_one_the_config_names(
    featurizer: Featurizer, shipped_model_dir: Path, tmp_path: Path
) -> None:
    from realtime_qa.training.abstain import load_teacher_run, run_abstain
    from realtime_qa.training.runs import RunPaths

    teacher_dir = save_run(tmp_path / "other_run", "other_run", tiny_weights(1), shipped_model_dir)
    config = TrainConfig("student", distill_alpha=0.5, teacher="abstain_teacher")
    with pytest.raises(ValueError, match="wants 'abstain_teacher'"):
        load_teacher_run(config, teacher_dir, featurizer)
    loose = tmp_path / "loose"
    loose.mkdir()
    with pytest.raises(FileNotFoundError, match="not the model/ folder of a finished run"):
        load_teacher_run(config, loose, featurizer)
    paths = RunPaths(tmp_path, shipped_model_dir, tmp_path / "cache", tmp_path / "run")
    with pytest.raises(ValueError, match="give its model folder"):
        run_abstain(config, paths, tmp_path / "negatives.jsonl.xz")
    with pytest.raises(ValueError, match="names no teacher run"):
        run_abstain(TrainConfig("student", distill_alpha=0.5), paths, tmp_path / "n.jsonl.xz", teacher_dir=teacher_dir)


def test_a_teacher_needs_distillation_and_the_checked_in_configs_name_theirs() -> None:
    with pytest.raises(InvalidInputError, match="needs distill_alpha < 1"):
        TrainConfig.from_dict({"name": "x", "teacher": "abstain_teacher"})
    configs = Path(__file__).resolve().parents[1] / "training" / "configs"
    teacher = TrainConfig.from_file(configs / "abstain_teacher.json")
    assert not teacher.distills and not teacher.teacher and teacher.epochs == 1
    students = [TrainConfig.from_file(path) for path in sorted(configs.glob("abstain_td_*.json"))]
    assert len(students) == 3 and all(s.teacher == "abstain_teacher" and s.distills for s in students)
    assert all(s.negative_kinds == teacher.negative_kinds for s in students)


def test_weight_delta_rebuilds_the_target_model_byte_for_byte(shipped_model_dir: Path, tmp_path: Path) -> None:
    from realtime_qa.builder.hf_export import save_hf_model
    from realtime_qa.training.weight_delta import apply_delta, encode_delta

    base_weights = tiny_weights(3)
    rng = np.random.default_rng(4)
    tuned = {name: value + rng.normal(0, 1e-3, value.shape).astype(np.float32) for name, value in base_weights.items()}
    tuned["qa_outputs.bias"] = -base_weights["qa_outputs.bias"]  # sign flips, -0 and +0 included
    tuned["bert.embeddings.token_type_embeddings.weight"][0, :2] = [-0.0, 0.0]
    save_hf_model(tmp_path / "base", TINY, base_weights, shipped_model_dir, shard_bytes=600_000)
    save_hf_model(tmp_path / "target", TINY, tuned, shipped_model_dir, shard_bytes=600_000)
    (tmp_path / "target" / "config.json").write_text('{"changed": true}')
    manifest = encode_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta.tar.xz")
    assert {entry["how"] for entry in manifest.values()} == {"words", "same", "whole"}
    apply_delta(tmp_path / "base", tmp_path / "delta.tar.xz", tmp_path / "rebuilt")
    for file in (tmp_path / "target").iterdir():
        assert (tmp_path / "rebuilt" / file.name).read_bytes() == file.read_bytes()
    with pytest.raises(ValueError, match="not the base"):
        apply_delta(tmp_path / "target", tmp_path / "delta.tar.xz", tmp_path / "wrong")


def test_model_card_describes_a_teacher_distilled_recipe() -> None:
    from realtime_qa.training.model_card import SHIPPED_RESULTS, render_abstention_section

    shipped = json.loads((SHIPPED_RESULTS / "abstain" / "abstain_all_sd" / "metrics.json").read_text())
    calibration = json.loads((SHIPPED_RESULTS / "abstain" / "abstain_all_sd" / "calibration.json").read_text())
    student = {**shipped, "config": {**shipped["config"], "name": "abstain_td_a05_t2", "teacher": "abstain_teacher"}}
    student["teacher"] = {
        "run": "abstain_teacher",
        "config": {"epochs": 2, "learning_rate": 3e-05},
        "tuned": shipped["tuned"],
    }
    card = render_abstention_section(student, calibration, -6.5, [])
    assert (
        "teacher **of the student's own size** trained with the same negatives (run `abstain_teacher`: 2 epochs" in card
    )
    assert f"SQuAD v1.1 dev F1 {shipped['tuned']['v1.1']['f1']:.2f}" in card
    assert "against the start model's own logits" not in card
    assert "against the start model's own logits" in render_abstention_section(shipped, calibration, -6.5, [])
