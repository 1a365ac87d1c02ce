"""The model card (README.md) of a trained student, written by the run from its own summary."""

from __future__ import annotations

import json
from pathlib import Path
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


NEGATIVE_KINDS_TEXT = {
    "sentence_removed": "the question's own paragraph with the sentence(s) holding the answer removed",
    "entity_swap": "the question with an entity of its paragraph (year, number, date, name) swapped for another of "
    "the same kind from the article that the paragraph lacks",
    "negation": "the question negated (was -> was not, did X build -> did X not build) or with a word flipped to "
    "an antonym the paragraph does not use",
    "bm25_distractor": "the question asked of the paragraph of its article most like it by BM25 that holds none of "
    "its answer texts",
}


def _pct(value: float) -> str:
    return f"{value:.2f}"


def _teacher_recipe(config: dict[str, Any], teacher: dict[str, Any]) -> str:
    """The distillation sentence of a student distilled from a teacher trained with the same negatives."""
    teacher_config, teacher_scores = teacher["config"], teacher["tuned"]
    return (
        f"; loss {config['distill_alpha']} x CE(gold) + {1 - config['distill_alpha']:.1f} x T^2 x KL at T = "
        f"{config['distill_temperature']} against the logits of a teacher **of the student's own size** trained with "
        f"the same negatives (run `{teacher['run']}`: {teacher_config['epochs']} epochs of plain cross-entropy from "
        f"the same start model, learning rate {teacher_config['learning_rate']}; SQuAD v1.1 dev F1 "
        f"{teacher_scores['v1.1']['f1']:.2f}, first-half v2.0 F1 {teacher_scores['v2.0']['first_half']['f1']:.2f}) on "
        "the positive AND the negative windows, so the teacher's null logit is a soft target (born-again "
        "distillation: the MPNet teacher of the start model could not travel to the GPU machine beside the data)."
    )


def _loss_sentence(config: dict[str, Any], teacher: dict[str, Any] | None) -> str:
    """How one abstention run's loss treats the negatives (plain CE, self-distillation or a teacher's)."""
    if config["distill_alpha"] >= 1.0:
        return "; plain cross-entropy."
    if teacher and "config" in teacher:
        return _teacher_recipe(config, teacher)
    if teacher:
        return f"; distilled from run `{teacher['run']}`."
    return (
        f"; loss {config['distill_alpha']} x CE(gold) + {1 - config['distill_alpha']:.1f} x T^2 x KL at T = "
        f"{config['distill_temperature']} against the start model's own logits on the positive windows "
        "([CLS] on the negative ones), so it keeps its answers while it learns to abstain."
    )


def render_abstention_section(
    summary: dict[str, Any],
    calibration: dict[str, Any],
    threshold: float,
    evals: list[dict[str, Any]],
    comparison: dict[str, Any] | None = None,
) -> str:
    """The model card's abstention section: the recipe of `qa-train abstain` (`summary` of the shipped run), the
    shipped threshold, and every figure (`evals`: rows of where/weights/command and the scores measured)."""
    config = summary["config"]
    tuned = summary["tuned"]["v2.0"]
    soup = summary.get("soup_of")
    if soup:
        how = (
            f"the **mean of the weights of {len(soup)} runs** (`qa-train soup`, config name `{config['name']}`), "
            "each tuned from the distilled model above by `qa-train abstain` for"
        )
    else:
        how = f"tuned from the distilled model above by `qa-train abstain` (config `{config['name']}`):"
    lines = [
        "## Abstention (SQuAD 2.0 behaviour without SQuAD 2.0 training data)",
        "",
        f"These weights are {how} one epoch over all {summary['positive_windows']:,} SQuAD v1.1 train windows plus "
        f"{summary['negative_windows']:,} windows of synthetic unanswerable questions made from SQuAD v1.1 train "
        "(`training/negatives.py`), each targeting [CLS] (the null answer):",
        "",
    ]
    for kind, count in summary["negative_examples"].items():
        lines.append(f"- `{kind}` ({count:,} questions): {NEGATIVE_KINDS_TEXT[kind]}.")
    lines += [
        "",
        f"Learning rate {config['learning_rate']}, batch {config['batch_size']}, warm-up {config['warmup_ratio']:.0%}, "
        f"dropout {config['dropout']}"
        + (
            "; the runs averaged:"
            if soup
            else f", seed {config['seed']}" + _loss_sentence(config, summary.get("teacher"))
        ),
    ]
    if soup:
        lines.append("")
        for part in soup:
            part_config, part_v2 = part["config"], part["tuned"]["v2.0"]
            lines.append(
                f"- `{part['run']}`: seed {part_config['seed']}"
                + _loss_sentence(part_config, {"run": part_config["teacher"]} if part_config.get("teacher") else None)
                + f" Alone: SQuAD v1.1 dev F1 {part['tuned']['v1.1']['f1']:.2f}, first-half v2.0 F1 "
                f"{part_v2['first_half']['f1']:.2f}."
            )
        lines += [
            "",
            "The mean is taken in float32 over the runs' float16 weights and rounded to float16; runs tuned for one "
            "short epoch from one start model stay in one basin of the loss, so their mean is itself a model "
            '(a uniform "model soup", Wortsman et al. 2022), of the same size and speed as each run.',
        ]
    lines += [
        f"{summary['device']}, PyTorch {summary['torch']}: {summary['train_seconds'] / 60:.1f} min of training"
        + (" (the runs side by side on one GPU)." if soup else "."),
        "SQuAD v2.0 dev was never trained on.",
        "",
        f"**Abstention threshold `qa_null_threshold` = {threshold:.4f}** (config.json): the decoder abstains when the "
        "null logit ([CLS] start + end) minus the best span's logit exceeds it, wherever `allow_null` is on; "
        "`--null-threshold` overrides it. It was tuned for best F1 on the **first half of the v2.0 dev articles "
        f"only** ({tuned['tuned_on']}); every v2.0 figure below is on the **second half** ({tuned['reported_on']}), "
        "which played no part in choosing it.",
        "",
        "| weights / engine | where | SQuAD v1.1 dev F1 (EM), abstention off | v2.0 dev 2nd half F1 | EM | HasAns F1 "
        "| NoAns F1 | command |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in evals:
        v1_scope = f" on the first {row['v1_questions']:,}" if row.get("v1_questions") else ""
        v2_scope = f" on the first {row['v2_questions']:,}" if row.get("v2_questions") else ""
        lines.append(
            f"| {row['what']} | {row['where']} | {_pct(row['v1_f1'])} ({_pct(row['v1_em'])}){v1_scope} | "
            f"{_pct(row['v2']['f1'])}{v2_scope} | {_pct(row['v2']['exact'])} | {_pct(row['v2']['HasAns_f1'])} | "
            f"{_pct(row['v2']['NoAns_f1'])} | {row['command']} |"
        )
    lines += [
        "",
        "`E` = `qa-build --default --precision fp32`, `E8` = `qa-build --default` (the default INT8 engine, "
        "SmoothQuant on the FFN MatMuls, activation ranges and channel maxima from the shipped `calibration.json`, "
        "made by `make calibration`: MinMax over 100 train questions spread over the file); every `qa-eval` with "
        "`--batch-size 16`, the datasets from `../shared/data/squad/`; all four runs by `benchmarks/cpu_accuracy.sh` "
        "(`benchmarks/results/cpu_accuracy.md`).",
    ]
    if comparison:
        lines += [
            "",
            "Engines on the same questions (v1.1: abstention off; v2.0: second half, shipped threshold):",
            "",
            "| questions | " + " | ".join(comparison["engines"]) + " |",
            "| --- | " + " | ".join("---:" for _ in comparison["engines"]) + " |",
        ]
        for label, values in comparison["rows"]:
            lines.append(f"| {label} | " + " | ".join("–" if v is None else _pct(v) for v in values) + " |")
    lines += [
        "",
        "Reliability on the second half of v2.0 dev. Confidence: the probability of what the decoder returns (the "
        "span when it answers, the null answer when it abstains) among the n-best spans and the null answer, with "
        "the null logit shifted by -threshold so that the probabilities agree with the decision "
        "(`training.calibration.returned_confidence`); right = exact match, or an abstention on an unanswerable "
        "question. Raw, and mapped through a Platt scaling P = sigmoid(a * logit(confidence) + b) fitted on the "
        f"first half (a = {calibration['platt_first_half'][0]:.4f}, b = {calibration['platt_first_half'][1]:.4f}):",
        "",
        "| confidence | raw: questions | mean confidence | accuracy | Platt-scaled: questions | mean confidence "
        "| accuracy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for raw, scaled in zip(
        calibration["reliability_second_half"], calibration["reliability_second_half_platt"], strict=True
    ):
        lines.append(
            f"| {raw['bucket']} | {raw['questions']:,} | {raw['mean_confidence']:.3f} | {raw['accuracy']:.3f} "
            f"| {scaled['questions']:,} | {scaled['mean_confidence']:.3f} | {scaled['accuracy']:.3f} |"
        )
    lines.append("")
    return "\n".join(lines)


SHIPPED_RESULTS = Path(__file__).resolve().parent / "results"
SHIPPED_ABSTAIN_RUN = "soup/soup_4"  # the shipped weights' run under SHIPPED_RESULTS (metrics.json, calibration.json)
CPU_EVALS = "cpu_evals.json"  # beside that run: {"rows": [...], "comparison": {...}} of `render_abstention_section`


def render_shipped_card(
    distill_summary: dict[str, Any],
    teacher_summary: dict[str, Any],
    abstain_summary: dict[str, Any],
    calibration: dict[str, Any],
    threshold: float,
    evals: list[dict[str, Any]],
    comparison: dict[str, Any] | None = None,
) -> str:
    """The card of the shipped model: the distilled student (its training and v1.1 figures before the
    abstention tuning) and the abstention tuning on top of it, with every figure of the shipped weights."""
    base = render_model_card(distill_summary, teacher_summary)
    name = abstain_summary["config"]["name"]
    base = base.replace(
        f"# minilm-l6-squad ({distill_summary['config']['name']})",
        f"# minilm-l6-squad ({distill_summary['config']['name']} + {name})\n\n"
        "These weights are the distilled student described under Results and Training, then tuned to abstain "
        "on unanswerable questions (section Abstention, which holds every figure of the shipped weights).",
        1,
    )
    base = base.replace(
        "| these float16 weights |", "| the distilled start model, float16 (before abstention tuning) |"
    )
    base = base.replace(
        "English extractive QA over passages; it always answers with a span (no abstention: trained on SQuAD\n"
        "v1.1, which has no unanswerable questions).",
        "English extractive QA over passages. It answers with a span, or abstains where `allow_null` is on and the\n"
        "null logit beats the best span by more than `qa_null_threshold`. Its unanswerable training questions are\n"
        "synthetic: SQuAD 2.0's own are harder. At the shipped threshold, on the held-out half,\n"
        f"{100 * calibration['second_half_answerable_refused']:.1f} % of answerable questions are refused and "
        f"{100 - calibration['second_half']['NoAns_f1']:.1f} % of unanswerable ones still get an answer.",
    )
    base = base.replace(
        "Base model and teacher: Apache-2.0. SQuAD v1.1: CC BY-SA 4.0.",
        "Base model and teacher: Apache-2.0. SQuAD v1.1 and v2.0: CC BY-SA 4.0.",
    )
    section = render_abstention_section(abstain_summary, calibration, threshold, evals, comparison)
    return base.replace("## Use and limits", section + "\n## Use and limits", 1)


def main() -> None:
    """Write models/minilm-l6-squad/README.md from the committed run results (training/results/)."""

    def read(path: Path) -> Any:
        return json.loads(path.read_text(encoding="utf-8"))

    model_dir = Path(__file__).resolve().parents[1] / "models" / "minilm-l6-squad"
    run_dir = SHIPPED_RESULTS / SHIPPED_ABSTAIN_RUN
    abstain = read(run_dir / "metrics.json")
    script = "soup" if abstain.get("soup_of") else "abstain"
    threshold = float(read(model_dir / "config.json")["qa_null_threshold"])
    cpu_path = run_dir.parent / CPU_EVALS
    evals = [
        {
            "what": "float16 weights, PyTorch bf16 autocast (training-time evaluation)",
            "where": abstain["device"],
            "v1_f1": abstain["tuned"]["v1.1"]["f1"],
            "v1_em": abstain["tuned"]["v1.1"]["exact_match"],
            "v2": abstain["tuned"]["v2.0"]["second_half"],
            "command": f"`bash training/device/{script}.sh` (training/README.md)",
        }
    ]
    cpu = read(cpu_path) if cpu_path.is_file() else {"rows": [], "comparison": None}
    card = render_shipped_card(
        read(SHIPPED_RESULTS / "distill_a0_t2_10ep" / "metrics.json"),
        read(SHIPPED_RESULTS / "teacher" / "metrics.json"),
        abstain,
        read(run_dir / "calibration.json"),
        threshold,
        evals + cpu["rows"],
        cpu["comparison"],
    )
    (model_dir / "README.md").write_text(card, encoding="utf-8")
    print(model_dir / "README.md")


if __name__ == "__main__":
    main()
