"""The model card (README.md) of a trained student, written by the run from its own summary."""

from __future__ import annotations

from typing import Any

BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads, uncased WordPiece)"
TEACHER_MODEL = "sentence-transformers/all-mpnet-base-v2 (MPNet, 12 layers, hidden 768), fine-tuned on SQuAD v1.1 here"


def render_model_card(summary: dict[str, Any], teacher_summary: dict[str, Any] | None = None) -> str:
    config = summary["config"]
    final = summary["final"]
    distilled = teacher_summary is not None
    how = "distilled from a larger teacher and fine-tuned" if distilled else "fine-tuned"
    lines = [
        f"# minilm-l6-squad ({config['name']})",
        "",
        "Extractive question answering (SQuAD v1.1 style: the answer is a span of the passage) with a 6-layer",
        f"BERT encoder and a span head, {how} on SQuAD v1.1.",
        "Weights are float16 safetensors shards in Hugging Face `BertForQuestionAnswering` layout.",
        "",
        "## Results (SQuAD v1.1 dev, 10,570 questions)",
        "",
        "| weights | exact match | F1 |",
        "| --- | ---: | ---: |",
        f"| these float16 weights | {final['exact_match']:.2f} | {final['f1']:.2f} |",
        "",
        "Decoding: `qacore.decoding.decode`, n-best 20, answers of at most 30 tokens; scoring:",
        "`qacore.squad_metric.evaluate_v1` (the official v1.1 rules). Per epoch (float32 weights during training):",
        "",
        "| epoch | step | exact match | F1 | train s |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for entry in summary["history"]:
        lines.append(
            f"| {entry['epoch']} | {entry['step']} | {entry.get('exact_match', float('nan')):.2f} "
            f"| {entry.get('f1', float('nan')):.2f} | {entry['train_seconds']:.0f} |"
        )
    lines += [
        "",
        "## Training",
        "",
        f"- Base model: {BASE_MODEL}; the span head starts from N(0, 0.02) drawn with seed {config['seed']}.",
        f"- Data: SQuAD v1.1 train ({summary.get('train_questions', 87599):,} questions) cut into "
        f"{summary['train_windows']:,} windows of at most {config['max_seq_length']} tokens, stride "
        f"{config['doc_stride']}, questions cut to {config['max_query_length']} tokens, by `qacore.features` "
        "(the runtime's own featurization); a window without the answer targets [CLS].",
        f"- Optimisation: AdamW (eps {config['adam_eps']}, weight decay {config['weight_decay']} on matrices), "
        f"learning rate {config['learning_rate']}, linear warm-up over {config['warmup_ratio']:.0%} of the steps "
        f"then linear decay to 0, batch {config['batch_size']}, {config['epochs']} epochs = "
        f"{summary['total_steps']:,} steps, gradient clipping {config['max_grad_norm']}, dropout {config['dropout']}, "
        f"bf16 autocast (float32 weights), seed {config['seed']}, batches grouped by window length: "
        f"{config['group_by_length']}.",
    ]
    if distilled:
        assert teacher_summary is not None
        teacher_final = teacher_summary["final"]
        teacher_config = teacher_summary["config"]
        lines += [
            f"- Distillation: loss = {config['distill_alpha']} x CE(gold) + {1 - config['distill_alpha']:.2f} x T^2 x "
            f"KL(teacher || student) at temperature T = {config['distill_temperature']}, over the start and end "
            "distributions of every training window, with the teacher's logits computed once on the same windows.",
            f"- Teacher: {TEACHER_MODEL}: {teacher_config['epochs']} epochs, learning rate "
            f"{teacher_config['learning_rate']}, batch {teacher_config['batch_size']}; dev EM "
            f"{teacher_final['exact_match']:.2f} / F1 {teacher_final['f1']:.2f}. It reads the student's windows "
            "(its vocabulary is BERT's shifted by 4), so both see the same tokens.",
        ]
    lines += [
        f"- Hardware and time: {summary['device']}, PyTorch {summary['torch']}; training "
        f"{summary['train_seconds'] / 60:.1f} min, whole run {summary['wall_seconds'] / 60:.1f} min"
        + (
            f" (teacher: {teacher_summary['wall_seconds'] / 60:.1f} min more)."
            if distilled and teacher_summary
            else "."
        ),
        "- Reproduce: see `training/README.md` (configs in `training/configs/`, `qa-train` commands).",
        "",
        "## Use and limits",
        "",
        "English extractive QA over passages; it always answers with a span (no abstention: trained on SQuAD",
        "v1.1, which has no unanswerable questions). Inputs are lower-cased WordPiece; windows of 384 tokens.",
        "",
        "## Licences",
        "",
        "Base model and teacher: Apache-2.0. SQuAD v1.1: CC BY-SA 4.0.",
        "",
    ]
    return "\n".join(lines)
