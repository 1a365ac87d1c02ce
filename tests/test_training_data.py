"""Training data and the training loop on CPU: real SQuAD, the shipped tokenizer, the shared featurization."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from realtime_qa.qacore.errors import InvalidInputError
from realtime_qa.qacore.features import Featurizer, FeaturizerConfig
from realtime_qa.qacore.squad import read_dataset
from realtime_qa.qacore.squad_metric import normalize_answer
from realtime_qa.qacore.tokenization import load_tokenizer
from realtime_qa.training.config import TrainConfig
from realtime_qa.training.data import build_eval_set, predict_texts, train_windows

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def featurizer(shipped_model_dir: Path) -> Featurizer:
    return Featurizer(load_tokenizer(shipped_model_dir), FeaturizerConfig())


@pytest.fixture(scope="module")
def train_subset(squad_dir: Path):
    return read_dataset(squad_dir / "train-v1.1.json.gz").head(600)


@pytest.fixture(scope="module")
def dev_subset(squad_dir: Path):
    return read_dataset(squad_dir / "dev-v1.1.json.gz").head(300)


def test_decoded_window_is_text_not_unknown_tokens(featurizer: Featurizer, train_subset) -> None:
    paragraph, question = next(train_subset.questions())
    features = featurizer.featurize(question.question, paragraph.context)
    ids = features.windows[0].input_ids
    unknown = featurizer.tokenizer.token_to_id("[UNK]")
    assert np.mean(ids == unknown) < 0.01
    decoded = featurizer.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    assert normalize_answer(question.question) in normalize_answer(decoded)
    assert (
        normalize_answer(paragraph.context[:80]).split()[:5]
        == normalize_answer(decoded).split()[len(normalize_answer(question.question).split()) :][:5]
    )


def test_targets_map_back_to_the_answer_text(featurizer: Featurizer, train_subset) -> None:
    arrays, stats = train_windows(train_subset.articles, featurizer)
    assert stats.questions == 600 and stats.windows == len(arrays) >= 600
    assert stats.answer_not_in_tokens == 0 and stats.answer_in_no_window == 0
    row = 0
    exact = 0
    for paragraph, question in train_subset.questions():
        passage = featurizer.encode_passage(paragraph.context)
        windows = featurizer.featurize(question.question, passage).windows
        found = []
        for window in windows:
            np.testing.assert_array_equal(arrays.input_ids[row, : window.seq_len], window.input_ids)
            start, end = int(arrays.start_positions[row]), int(arrays.end_positions[row])
            if (start, end) != (0, 0):
                first = window.passage_start + start - window.context_offset
                last = window.passage_start + end - window.context_offset
                found.append(paragraph.context[passage.offsets[first, 0] : passage.offsets[last, 1]])
            row += 1
        assert found, question.id
        gold = question.answers[0].text
        assert all(normalize_answer(gold) in normalize_answer(text) for text in found), (gold, found)
        exact += all(normalize_answer(text) == normalize_answer(gold) for text in found)
    assert row == len(arrays)
    assert exact / stats.questions > 0.99  # the rest are answers cut inside a word ("1870s" for "1870")


def test_window_arrays_match_the_runtime_batch(featurizer: Featurizer, dev_subset) -> None:
    eval_set = build_eval_set(dev_subset, featurizer)
    windows = [window for features in eval_set.features for window in features.windows]
    batch = featurizer.batch(windows, seq_len=eval_set.windows.width)
    np.testing.assert_array_equal(eval_set.windows.input_ids, batch.input_ids)
    np.testing.assert_array_equal(eval_set.windows.segment_ids(), batch.segment_ids)
    np.testing.assert_array_equal(eval_set.windows.input_mask(), batch.input_mask)


def test_gold_logits_decode_to_gold_answers(featurizer: Featurizer, dev_subset) -> None:
    """Logits that point at each question's first gold answer score EM 100 through decode and evaluate_v1."""
    from realtime_qa.qacore.features import answer_positions, char_span_to_token_span
    from realtime_qa.qacore.squad_metric import evaluate_v1

    eval_set = build_eval_set(dev_subset, featurizer)
    start = np.zeros((len(eval_set.windows), eval_set.windows.width), np.float32)
    end = np.zeros_like(start)
    questions = [question for _, question in dev_subset.questions()]
    for index, (features, question) in enumerate(zip(eval_set.features, questions, strict=True)):
        answer = question.answers[0]
        span = char_span_to_token_span(features.passage, answer.answer_start, answer.answer_start + len(answer.text))
        for row, window in enumerate(features.windows):
            s, e = answer_positions(window, span)
            start[eval_set.first_window[index] + row, s] = 10.0
            end[eval_set.first_window[index] + row, e] = 10.0
    predictions = predict_texts(eval_set, start, end)
    assert evaluate_v1(dev_subset, predictions)["exact_match"] > 95.0
    # The misses are gold spans that end inside a token ("gold" of "golden", "8" of "18"): the whole token comes back.
    for question in questions:
        if not any(normalize_answer(predictions[question.id]) == normalize_answer(g) for g in question.answer_texts):
            assert question.answers[0].text in predictions[question.id]


def test_teacher_inputs_are_mpnet_pairs_and_logits_align() -> None:
    torch = pytest.importorskip("torch")
    from realtime_qa.qacore.features import SpecialTokens
    from realtime_qa.training.teacher import student_positions, teacher_input_ids

    special = SpecialTokens(cls_id=101, sep_id=102, pad_id=0)
    question, passage = [2054, 2003], [1996, 4937, 2938, 1012]
    ids = torch.tensor([[101, *question, 102, *passage, 102, 0, 0]])
    teacher, mask = teacher_input_ids(ids, torch.tensor([9]), torch.tensor([4]), special)
    shifted = [token + 4 for token in question], [token + 4 for token in passage]
    assert teacher.tolist() == [[0, *shifted[0], 2, 2, *shifted[1], 2, 1, 1]]
    assert mask.tolist() == [[1] * 10 + [0] * 2]
    # Logits equal to the teacher position come back at the student positions they read.
    logits = torch.arange(12, dtype=torch.float32)[None, :]
    assert student_positions(logits, torch.tensor([4])).tolist() == [[0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11]]


def test_distillation_loss_vanishes_only_when_student_matches_teacher() -> None:
    torch = pytest.importorskip("torch")
    from realtime_qa.training.distill import distillation_loss

    generator = torch.Generator().manual_seed(0)
    teacher_start, teacher_end = torch.randn(4, 16, generator=generator), torch.randn(4, 16, generator=generator)
    gold = torch.zeros(4, dtype=torch.long)
    same = distillation_loss(teacher_start, teacher_end, teacher_start, teacher_end, gold, gold, 0.0, 2.0)
    other = distillation_loss(teacher_end, teacher_start, teacher_start, teacher_end, gold, gold, 0.0, 2.0)
    assert abs(float(same)) < 1e-6 and float(other) > 0.01


@pytest.mark.slow
def test_cpu_training_steps_reduce_the_loss(shipped_model_dir: Path, featurizer: Featurizer, train_subset, tmp_path):
    torch = pytest.importorskip("torch")
    from realtime_qa.builder.checkpoint import load_checkpoint
    from realtime_qa.qacore.backends.torch_network import BertForQA
    from realtime_qa.training.finetune import TRAIN_LOG, StudentQA, train

    arrays, _ = train_windows(train_subset.head(4).articles, featurizer)  # one small batch: seconds, not a minute
    checkpoint = load_checkpoint(shipped_model_dir, init_qa_head_seed=0)
    net = BertForQA(checkpoint.config, dropout=0.0)
    net.load_weights(checkpoint.weights)
    config = TrainConfig(
        name="cpu-test", epochs=6, batch_size=4, learning_rate=1e-4, warmup_ratio=0.0, dropout=0.0,
        bf16=False, group_by_length=False, log_every=1,
    )  # fmt: skip
    summary = train(StudentQA(net), config, arrays, None, tmp_path, torch.device("cpu"), save_checkpoints=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / TRAIN_LOG).read_text().splitlines() if "loss" in line]
    assert summary["steps"] == 6 and len(losses) == 6
    assert losses[-1] < 0.8 * losses[0]


def test_training_config_rejects_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "x", "learning_rat": 1e-4}))
    result = subprocess.run(
        [sys.executable, "-m", "realtime_qa.training.cli", "finetune", "--config", str(path), "--base", "/nonexistent",
         "--cache-dir", str(tmp_path), "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "qa-train: error: unknown training config keys: learning_rat"


def test_checked_in_configs_load() -> None:
    names = {TrainConfig.from_file(path).name for path in (REPO / "training" / "configs").glob("*.json")}
    assert len(names) >= 3


def test_export_parts_ship_as_the_same_model(shipped_model_dir: Path, tmp_path: Path) -> None:
    from realtime_qa.qacore.errors import CheckpointError
    from realtime_qa.training.runs import pack_export, ship

    parts = pack_export(shipped_model_dir, tmp_path / "export", part_bytes=8 * 1024 * 1024)
    assert len(parts) > 1 and all(part.stat().st_size <= 8 * 1024 * 1024 for part in parts)
    shipped = ship(tmp_path / "export", tmp_path / "out")
    assert sorted(file.name for file in shipped) == sorted(file.name for file in shipped_model_dir.iterdir())
    for file in shipped:
        assert file.read_bytes() == (shipped_model_dir / file.name).read_bytes()
    parts[1].write_bytes(parts[1].read_bytes()[:-1] + b"\0")
    with pytest.raises(CheckpointError, match="do not reassemble"):
        ship(tmp_path / "export", tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()


def test_negatives_pair_questions_with_other_articles_and_target_cls(featurizer: Featurizer, train_subset) -> None:
    from realtime_qa.training.negatives import negative_windows, sample_negatives

    articles = train_subset.articles
    assert len(articles) >= 2
    negatives, _ = sample_negatives(articles, 0.5, "other_article", seed=7)
    assert abs(len(negatives) - 300) <= 3  # half of the 600 questions, minus any with no answer-free paragraph
    owner = {q.id: a for a, article in enumerate(articles) for p in article.paragraphs for q in p.questions}
    for negative in negatives:
        assert negative.article != negative.question_article == owner[negative.question.id]
        context = articles[negative.article].paragraphs[negative.paragraph].context
        assert all(answer.text.lower() not in context.lower() for answer in negative.question.answers)
    arrays, stats = negative_windows(articles, featurizer, 0.5, "other_article", seed=7)
    assert stats.questions == len(negatives) and stats.windows == len(arrays) >= len(negatives)
    assert not arrays.start_positions.any() and not arrays.end_positions.any()  # every window targets [CLS]
    first = negatives[0]
    context = articles[first.article].paragraphs[first.paragraph].context
    window = featurizer.featurize(first.question.question, context).windows[0]
    np.testing.assert_array_equal(arrays.input_ids[0, : window.seq_len], window.input_ids)
    same, _ = sample_negatives(articles, 0.5, "same_article", seed=7)
    for negative in same:
        paragraph = articles[negative.article].paragraphs[negative.paragraph]
        assert negative.article == negative.question_article and negative.question not in paragraph.questions


# --- Harder negatives (issue 11) --------------------------------------------------------------------------------

_PARAGRAPH = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders from Denmark, Iceland and Norway. In 911 Rollo swore fealty "
    "to King Charles III of West Francia. The Norman dynasty had a major political impact on medieval Europe."
)


def _question(text: str, answer: str, context: str = _PARAGRAPH, qid: str = "q1"):
    from realtime_qa.qacore.squad import Answer, Question

    return Question(qid, text, (Answer(answer, context.index(answer)),))


def _article(*paragraphs: tuple[str, tuple]):
    from realtime_qa.qacore.squad import Article, Paragraph

    return Article("Normans", tuple(Paragraph(context, questions) for context, questions in paragraphs))


def test_sentence_spans_cover_each_sentence_once() -> None:
    from realtime_qa.training.negatives import sentence_spans

    spans = sentence_spans(_PARAGRAPH)
    assert [_PARAGRAPH[s:e] for s, e in spans][
        1
    ] == "They were descended from Norse raiders from Denmark, Iceland and Norway."
    assert len(spans) == 4 and _PARAGRAPH[spans[-1][0] :].startswith("The Norman dynasty")
    assert sentence_spans('He said "Stop." Then he left.') == [(0, 15), (16, 29)]


def test_sentence_removed_drops_the_answer_sentence_and_keeps_the_rest() -> None:
    from realtime_qa.training.negatives import remove_answer_sentence

    question = _question("Who swore fealty to King Charles III?", "Rollo")
    rest = remove_answer_sentence(_PARAGRAPH, question)
    assert rest is not None and "Rollo" not in rest and "fealty" not in rest
    assert rest.startswith("The Normans were") and rest.endswith("on medieval Europe.")
    # The answer text also stands in another sentence: the question stays answerable, so no negative.
    twice = _question("Where is Normandy?", "France", _PARAGRAPH + " France is large.")
    assert remove_answer_sentence(_PARAGRAPH + " France is large.", twice) is None
    # A one-sentence paragraph has nothing left.
    alone = "Rollo swore fealty in 911."
    assert remove_answer_sentence(alone, _question("Who swore fealty?", "Rollo", alone)) is None


def test_find_entities_types_years_numbers_dates_and_names() -> None:
    from realtime_qa.training.negatives import find_entities

    text = "When did Rollo meet King Charles III on March 3, 1912 with 1,200 men in Normandy?"
    found = {text[s:e]: kind for s, e, kind in find_entities(text)}
    assert found["March 3, 1912"] == "month_date"
    assert found["1,200"] == "number"
    assert found["Rollo"] == "name" and found["Normandy"] == "name" and found["King Charles III"] == "name"
    assert "When" not in found and all(not name.startswith("When") for name in found)
    other = "In 1066 the Normans"
    assert {other[s:e]: k for s, e, k in find_entities(other)} == {"1066": "year", "Normans": "name"}


def test_entity_swap_replaces_an_entity_of_the_paragraph_with_one_of_the_article_it_lacks() -> None:
    from realtime_qa.training.negatives import article_entities, swap_entity

    other = "Rollo later fought in Brittany in 925. His son William Longsword ruled after 927."
    entities = article_entities([_PARAGRAPH, other])
    rng = np.random.default_rng(0)
    for _ in range(10):
        swapped = swap_entity("What did Rollo do in 911?", _PARAGRAPH, entities, rng)
        assert swapped is not None and swapped != "What did Rollo do in 911?"
        assert swapped in {"What did Rollo do in 925?", "What did Rollo do in 927?", "What did Brittany do in 911?"}
    # Nothing of the same kind outside the paragraph: no negative.
    assert swap_entity("What did Rollo do in 911?", _PARAGRAPH, article_entities([_PARAGRAPH]), rng) is None
    # An entity the paragraph does not mention is not what ties the question to it: not swapped.
    assert swap_entity("What did Brittany do?", _PARAGRAPH, entities, rng) is None


def test_negation_negates_or_flips_to_an_antonym_the_paragraph_lacks() -> None:
    from realtime_qa.training.negatives import negate_question

    rng = np.random.default_rng(0)
    drawn = {negate_question("Who was the king of West Francia?", _PARAGRAPH, rng) for _ in range(20)}
    assert drawn == {"Who was not the king of West Francia?", "Who was the king of East Francia?"}
    assert negate_question("What did the Normans give to Normandy?", _PARAGRAPH, rng) == (
        "What did the Normans not give to Normandy?"
    )
    assert negate_question("Who came first?", "Rollo came.", rng) == "Who came last?"
    # The paragraph speaks of the last one too: flipping would make another answerable question.
    assert negate_question("Who came first?", "Rollo came first and Hrolf last.", rng) is None
    assert negate_question("Rollo?", _PARAGRAPH, rng) is None


def test_bm25_picks_the_most_similar_paragraph_without_the_answer() -> None:
    from realtime_qa.training.negatives import Bm25, bm25_distractor

    question = _question("Who swore fealty to King Charles III?", "Rollo")
    similar = "King Charles III of West Francia received fealty from many lords, in 911 and later."
    similar_with_answer = "King Charles III took fealty from Rollo."
    unrelated = "Bread is baked in ovens."
    article = _article((_PARAGRAPH, (question,)), (unrelated, ()), (similar_with_answer, ()), (similar, ()))
    scores = Bm25([p.context for p in article.paragraphs]).scores(question.question)
    assert scores[1] == 0 and scores[3] > 0 and scores[2] > 0
    assert bm25_distractor(question, 0, article) == similar
    lonely = _article((_PARAGRAPH, (question,)), (unrelated, ()))
    assert bm25_distractor(question, 0, lonely) is None  # shares no term: not a distractor


def test_hard_negatives_on_real_train_data_round_trip_and_target_cls(
    featurizer: Featurizer, train_subset, tmp_path: Path
) -> None:
    from realtime_qa.training.negatives import (
        HARD_KINDS,
        example_windows,
        hard_negatives,
        read_examples,
        write_examples,
    )

    articles = train_subset.articles
    examples, stats = hard_negatives(articles, HARD_KINDS, 0.5, seed=3)
    assert set(stats.attempted.values()) == {300}
    assert all(stats.made[kind] >= 150 for kind in HARD_KINDS), stats  # each kind rewrites most questions
    questions = {q.id: (q, p.context) for a in articles for p in a.paragraphs for q in p.questions}
    for example in examples:
        question, context = questions[example.source_id]
        if example.kind in ("sentence_removed", "bm25_distractor"):
            assert example.question == question.question and example.context != context
            assert all(answer.text.lower() not in example.context.lower() for answer in question.answers)
        else:
            assert example.question != question.question and example.context == context
    again, _ = hard_negatives(articles, HARD_KINDS, 0.5, seed=3)
    assert again == examples  # seeded
    path = tmp_path / "negatives.jsonl.xz"
    write_examples(path, examples)
    assert read_examples(path) == examples
    assert read_examples(path, ["negation"]) == [e for e in examples if e.kind == "negation"]
    arrays, window_stats = example_windows(examples[:50], featurizer)
    assert window_stats.questions == 50 and len(arrays) >= 50
    assert not arrays.start_positions.any() and not arrays.end_positions.any()
    with pytest.raises(InvalidInputError, match="kinds"):
        hard_negatives(articles, ["made_up"], 0.5, seed=3)


# --- Abstention threshold and calibration ------------------------------------------------------------------------


def _v2_dataset():
    from realtime_qa.qacore.squad import SquadDataset

    def article(title: str, questions: list[tuple[str, str | None]]) -> dict:
        context = "Rollo swore fealty in 911 to King Charles."
        qas = [
            {
                "id": qid,
                "question": "Who?",
                "answers": [] if answer is None else [{"text": answer, "answer_start": context.index(answer)}],
                "is_impossible": answer is None,
            }
            for qid, answer in questions
        ]
        return {"title": title, "paragraphs": [{"context": context, "qas": qas}]}

    data = [
        article("a", [("a1", "Rollo"), ("a2", None), ("a3", "911"), ("a4", None)]),
        article("b", [("b1", "Rollo"), ("b2", None)]),
        article("c", [("c1", "911"), ("c2", None), ("c3", None)]),
    ]
    return SquadDataset.from_json_obj({"version": "v2.0", "data": data})


def test_article_half_splits_by_article_and_qa_eval_scores_one_half(tmp_path: Path) -> None:
    dataset = _v2_dataset()
    first, second = dataset.article_half("first"), dataset.article_half("second")
    assert [a.title for a in first.articles] == ["a"] and [a.title for a in second.articles] == ["b", "c"]
    assert first.num_questions + second.num_questions == dataset.num_questions
    with pytest.raises(InvalidInputError, match="article half"):
        dataset.article_half("middle")
    data_file = tmp_path / "dev.json"
    data_file.write_text(json.dumps({"version": "v2.0", "data": dataset.raw_articles}))
    predictions = tmp_path / "pred.json"
    predictions.write_text(json.dumps({"a1": "Rollo", "a2": "", "a3": "x", "a4": "", "b1": "Rollo", "b2": "x"}))
    command = [
        sys.executable,
        "-m",
        "realtime_qa.qacore.eval_cli",
        str(data_file),
        str(predictions),
        "--article-half",
        "first",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    scores = json.loads(result.stdout)
    assert scores["total"] == 4 and scores["exact"] == 75.0  # article a only: a3 wrong
    result = subprocess.run([*command[:-1], "second"], capture_output=True, text=True, cwd=REPO)
    assert json.loads(result.stdout)["total"] == 5  # b and c; c's questions are unanswered (count as wrong)


def test_threshold_is_tuned_on_the_first_half_and_reported_on_the_second() -> None:
    from realtime_qa.training.calibration import QuestionScore, calibrate, scores_at, tune_threshold

    dataset = _v2_dataset()
    # Unanswerable questions have high null margins except b2; answerable ones low.
    margins = {"a1": -5.0, "a2": 1.0, "a3": -4.0, "a4": 2.0, "b1": -4.5, "b2": -6.0, "c1": -5.0, "c2": 3.0, "c3": 0.5}
    texts = {"a1": "Rollo", "a3": "911", "b1": "Rollo", "c1": "911"}
    scores = {qid: QuestionScore(texts.get(qid, "fealty"), margin, 0.5, 0.5) for qid, margin in margins.items()}
    threshold = tune_threshold(dataset.article_half("first"), scores)
    assert threshold == -4.0  # the largest margin still answered: a1, a3 answered; a2, a4 abstain
    second = scores_at(dataset.article_half("second"), scores, threshold)
    assert second["total"] == 5 and second["exact"] == 80.0  # all right but b2 (margin -6 answered)
    report = calibrate(dataset, scores)
    second_half, reliability = report["second_half"], report["reliability_second_half"]
    assert report["null_threshold"] == threshold and isinstance(second_half, dict) and second_half["exact"] == 80.0
    assert isinstance(reliability, list) and sum(row["questions"] for row in reliability) == 5


def test_returned_confidence_agrees_with_the_decision() -> None:
    from realtime_qa.training.calibration import QuestionScore, returned_confidence

    # p_null 0.2, p_span 0.7; margin -1.2 (about ln(0.2 / 0.7)). At threshold -2 the model abstains.
    score = QuestionScore("x", -1.2, 0.7, 0.2)
    abstains, confidence = returned_confidence(score, -2.0)
    assert abstains and confidence > 0.5  # the shifted null answer outranks the span
    answers, span_confidence = returned_confidence(score, 0.0)
    assert not answers and span_confidence == pytest.approx(0.7)


def test_ship_keeps_files_others_add_and_writes_the_threshold(shipped_model_dir: Path, tmp_path: Path) -> None:
    from realtime_qa.builder.checkpoint import read_null_threshold
    from realtime_qa.training.calibration import set_null_threshold
    from realtime_qa.training.runs import pack_export, ship

    pack_export(shipped_model_dir, tmp_path / "export")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.json").write_text("{}")
    (out / "model-00009-of-00009.safetensors").write_bytes(b"old shard")
    ship(tmp_path / "export", out)
    assert (out / "notes.json").read_text() == "{}"
    assert not (out / "model-00009-of-00009.safetensors").exists()
    set_null_threshold(out, -3.25)
    assert read_null_threshold(out / "config.json") == -3.25


def test_negative_kinds_in_configs_are_checked() -> None:
    config = TrainConfig.from_dict({"name": "x", "negative_kinds": ["negation", "entity_swap"]})
    assert config.negative_kinds == ("negation", "entity_swap")
    with pytest.raises(InvalidInputError, match="negative_kinds"):
        TrainConfig.from_dict({"name": "x", "negative_kinds": ["paraphrase"]})


def test_self_distillation_targets_are_the_start_model_on_positives_and_cls_on_negatives(
    shipped_model_dir: Path, featurizer: Featurizer, train_subset
) -> None:
    import torch
    from realtime_qa.builder.checkpoint import load_checkpoint
    from realtime_qa.qacore.backends.torch_network import BertForQA
    from realtime_qa.training.abstain import self_distillation_targets
    from realtime_qa.training.finetune import PAD_LOGIT, StudentQA, window_logits
    from realtime_qa.training.negatives import NegativeExample, example_windows

    positives, _ = train_windows(train_subset.head(3).articles, featurizer)
    paragraph, question = next(train_subset.questions())
    negatives, _ = example_windows(
        [NegativeExample("negation", question.id, "Who was not?", paragraph.context)], featurizer
    )
    checkpoint = load_checkpoint(shipped_model_dir)
    net = BertForQA(checkpoint.config)
    net.load_weights(checkpoint.weights)
    model = StudentQA(net)
    config = TrainConfig("x", bf16=False, eval_batch_size=4)
    start, end = self_distillation_targets(model, positives, negatives, config, torch.device("cpu"))
    assert start.shape == end.shape == (len(positives) + len(negatives), positives.width)
    expected, _ = window_logits(model, positives, torch.device("cpu"), 4, False)
    np.testing.assert_allclose(start[: len(positives)].float().numpy(), expected, rtol=1e-2, atol=1e-2)
    negative_rows = start[len(positives) :].float().numpy()
    assert (negative_rows[:, 0] == 0).all() and (negative_rows[:, 1:] == np.float16(PAD_LOGIT)).all()
