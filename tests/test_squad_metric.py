"""The SQuAD reader and metric: official leaderboard conformance, the official edge cases, hand-checked cases."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from realtime_qa.qacore.errors import InvalidInputError
from realtime_qa.qacore.squad import (
    SquadDataset,
    read_dataset,
    read_na_probs,
    read_predictions,
    write_na_probs,
    write_predictions,
)
from realtime_qa.qacore.squad_metric import (
    evaluate,
    exact_match,
    f1_v1,
    f1_v2,
    gold_answers_v2,
    normalize_answer,
)

SQUAD_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad"
LEADERBOARD = SQUAD_DIR / "leaderboard"
DATASETS = {"v1.1": "dev-v1.1.json.gz", "v2.0": "dev-v2.0.json.gz"}


def _official_scores() -> dict[str, Any]:
    return json.loads((LEADERBOARD / "official_scores.json").read_text(encoding="utf-8"))


def _leaderboard_cases() -> list[tuple[str, str]]:
    if not LEADERBOARD.is_dir():
        return []
    official = _official_scores()
    return [(version, name) for version in ("v1.1", "v2.0") for name in official[version]]


def printed(expected: dict[str, Any]) -> dict[str, Any]:
    """The keys the official script prints (official_scores.json adds _notes and the source path)."""
    return {key: value for key, value in expected.items() if not key.startswith("_") and key != "source_path"}


@pytest.fixture(scope="module")
def dev_sets() -> dict[str, SquadDataset]:
    return {version: read_dataset(SQUAD_DIR / name) for version, name in DATASETS.items()}


# --- conformance with the official scripts ---------------------------------------------------------


@pytest.mark.parametrize(("version", "name"), _leaderboard_cases())
def test_leaderboard_submission_scores_equal_official(
    dev_sets: dict[str, SquadDataset], version: str, name: str
) -> None:
    expected = _official_scores()[version][name]
    scores = evaluate(dev_sets[version], read_predictions(LEADERBOARD / name))
    # Equal floats, equal key order, and so the same printed text to the last digit.
    assert scores.values == printed(expected)
    assert list(scores.values) == list(printed(expected))
    indent = None if version == "v1.1" else 2
    assert scores.to_json() == json.dumps(printed(expected), indent=indent)
    assert len(scores.missing_predictions) == expected.get("_missing_predictions", 0)


def test_every_leaderboard_file_is_covered() -> None:
    official = _official_scores()
    files = sorted(path.name for path in LEADERBOARD.glob("v*.json.gz"))
    assert files == sorted([*official["v1.1"], *official["v2.0"]])
    assert len(official["v1.1"]) == 5 and len(official["v2.0"]) == 3


def test_v11_submission_lacking_predictions_counts_them_as_zero(dev_sets: dict[str, SquadDataset]) -> None:
    name = "v1.1__Logistic_Regression_Baseline_Stanford_University.json.gz"
    predictions = read_predictions(LEADERBOARD / name)
    scores = evaluate(dev_sets["v1.1"], predictions)
    assert len(scores.missing_predictions) == 13
    assert not set(scores.missing_predictions) & set(predictions)
    # Answering the 13 with nonsense changes nothing: they already scored 0 over all 10,570 questions.
    filled = {**predictions, **dict.fromkeys(scores.missing_predictions, "zzzz qqqq")}
    assert evaluate(dev_sets["v1.1"], filled).values == scores.values


def _edge_cases() -> list[dict[str, Any]]:
    path = LEADERBOARD / "metric_edge_cases.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("case", _edge_cases(), ids=lambda case: f"{case['pred']!r}-vs-{case['gold']!r}")
def test_official_edge_case(case: dict[str, Any]) -> None:
    pred, gold = case["pred"], case["gold"]
    assert normalize_answer(pred) == case["norm_pred"]
    assert normalize_answer(gold) == case["norm_gold"]
    assert exact_match(pred, gold) == case["v1_em"]
    assert round(f1_v1(pred, gold), 6) == case["v1_f1"]  # the file rounds F1 to 6 decimals
    golds = gold_answers_v2([gold])
    assert max(exact_match(pred, g) for g in golds) == case["v2_em"]
    assert round(max(f1_v2(pred, g) for g in golds), 6) == case["v2_f1"]


def test_edge_cases_file_is_not_empty() -> None:
    assert len(_edge_cases()) >= 10


def test_edge_cases_through_whole_evaluation() -> None:
    """The same pairs as one-question datasets under each version's evaluate(), scaled by 100."""
    for case in _edge_cases():
        dataset = make_dataset([("q", [case["gold"]])], version="1.1")
        v1 = evaluate(dataset, {"q": case["pred"]})
        assert v1["exact_match"] == 100.0 * case["v1_em"]
        assert round(v1["f1"], 4) == round(100.0 * case["v1_f1"], 4)
        v2 = evaluate(dataset, {"q": case["pred"]}, version="2.0")
        assert v2["exact"] == 100.0 * case["v2_em"]
        assert round(v2["f1"], 4) == round(100.0 * case["v2_f1"], 4)


# --- hand-checked cases ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The  Quick, brown-fox!", "quick brownfox"),
        ("theatre", "theatre"),  # "the" inside a word stays
        ("banana an", "banana"),
        ("A.B.C.", "abc"),  # punctuation goes before articles are matched
        ("the.", ""),
        ("a_b", "ab"),  # "_" is in string.punctuation
        ("«Ångström»", "«ångström»"),  # non-ASCII punctuation stays
        ("\tNew\n York ", "new york"),
        ("THE END", "end"),
        ("An (a) The", ""),
    ],
)
def test_normalize_answer(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


def test_f1_counts_shared_tokens_with_multiplicity() -> None:
    # pred [cat, sat], gold [cat, sat, on, mat]: precision 1, recall 1/2 -> F1 2/3
    assert f1_v1("the cat sat", "cat sat on the mat") == pytest.approx(2 / 3)
    # pred [paris, paris] vs gold [paris]: one shared token, precision 1/2, recall 1 -> 2/3
    assert f1_v1("Paris Paris", "Paris") == pytest.approx(2 / 3)
    assert f1_v2("Paris Paris", "Paris") == pytest.approx(2 / 3)
    assert f1_v1("Paris", "London") == 0


def test_empty_sides_differ_between_versions() -> None:
    assert f1_v1("", "") == 0 and f1_v2("", "") == 1
    assert f1_v1("", "Paris") == 0 and f1_v2("", "Paris") == 0
    assert f1_v2("Paris", "") == 0
    assert exact_match("", "the") == 1  # both normalise to ""


def make_dataset(items: list[tuple[str, list[str]]], version: str = "v2.0", context: str = "ctx") -> SquadDataset:
    """One paragraph per question; an empty answer list makes the question unanswerable."""
    return SquadDataset.from_json_obj(
        {
            "version": version,
            "data": [
                {
                    "title": "t",
                    "paragraphs": [
                        {
                            "context": context,
                            "qas": [
                                {
                                    "id": qid,
                                    "question": f"question {qid}?",
                                    "answers": [{"text": text, "answer_start": 0} for text in answers],
                                    "is_impossible": not answers,
                                }
                            ],
                        }
                        for qid, answers in items
                    ],
                }
            ],
        }
    )


def test_v11_takes_the_best_gold_answer_and_ignores_duplicates() -> None:
    dataset = make_dataset([("q1", ["Paris", "Paris", "the city of Paris"]), ("q2", ["red apple", "red apple"])], "1.1")
    scores = evaluate(dataset, {"q1": "city of Paris", "q2": "apple"})
    # q1: exact with gold 3 -> EM 1, F1 1; q2: EM 0, F1 2/3
    assert scores["exact_match"] == 50.0
    assert scores["f1"] == 100.0 * (1 + 2 / 3) / 2
    assert scores.to_json() == json.dumps({"exact_match": 50.0, "f1": 100.0 * (1 + 2 / 3) / 2})


def test_v11_missing_predictions_score_zero_and_extra_ids_are_ignored() -> None:
    dataset = make_dataset([("q1", ["Paris"]), ("q2", ["London"]), ("q3", ["Rome"]), ("q4", ["Oslo"])], "1.1")
    scores = evaluate(dataset, {"q1": "Paris", "q3": "rome!", "not-a-question": "Paris"})
    assert scores.values == {"exact_match": 50.0, "f1": 50.0}
    assert scores.missing_predictions == ["q2", "q4"]


def test_v11_refuses_a_question_without_gold_answers() -> None:
    dataset = make_dataset([("q1", ["Paris"]), ("q2", [])], "1.1")
    with pytest.raises(InvalidInputError, match=r"q2 .* no gold answer"):
        evaluate(dataset, {"q1": "Paris", "q2": ""})


def test_v20_drops_gold_answers_that_normalise_to_nothing() -> None:
    dataset = make_dataset([("q1", ["the", "Paris"]), ("q2", ["an"])])
    # q1's gold is ["Paris"]: "" is wrong. q2's only gold normalises to "", so its gold is [""]: "" is right.
    scores = evaluate(dataset, {"q1": "", "q2": ""})
    assert (scores["exact"], scores["f1"]) == (50.0, 50.0)
    assert scores["HasAns_total"] == 2 and "NoAns_total" not in scores.values
    # Under v1.1 the same "" matches "the" exactly (EM 1) but shares no token (F1 0).
    v1 = evaluate(dataset, {"q1": "", "q2": ""}, version="1.1")
    assert v1.values == {"exact_match": 100.0, "f1": 0.0}


def _four_questions() -> tuple[SquadDataset, dict[str, str], dict[str, float]]:
    dataset = make_dataset([("q1", ["Paris"]), ("q2", ["red apple"]), ("q3", []), ("q4", [])])
    predictions = {"q1": "Paris", "q2": "apple", "q3": "London", "q4": ""}
    na_probs = {"q1": 0.1, "q2": 0.6, "q3": 0.8, "q4": 0.3}
    return dataset, predictions, na_probs


def test_v20_splits_answerable_and_unanswerable() -> None:
    dataset, predictions, _ = _four_questions()
    scores = evaluate(dataset, predictions)
    # exact per question [1, 0, 0, 1]; F1 [1, 2/3, 0, 1]
    assert scores.values == {
        "exact": 50.0,
        "f1": 100.0 * (1 + 2 / 3 + 0 + 1) / 4,
        "total": 4,
        "HasAns_exact": 50.0,
        "HasAns_f1": 100.0 * (1 + 2 / 3) / 2,
        "HasAns_total": 2,
        "NoAns_exact": 50.0,
        "NoAns_f1": 50.0,
        "NoAns_total": 2,
    }
    assert scores.to_json().startswith('{\n  "exact": 50.0,\n  "f1": 66.66666666666666,\n  "total": 4,')


def test_v20_na_prob_threshold_and_best_threshold() -> None:
    dataset, predictions, na_probs = _four_questions()
    at_default = evaluate(dataset, predictions, na_probs=na_probs)  # threshold 1.0: nothing flips
    assert (at_default["exact"], at_default["total"]) == (50.0, 4)
    # Sweep (rising na_prob): start at 2 (q3, q4 abstain correctly); q1 +1 -> 3 (best exact, at 0.1);
    # q4 answered "" +0; q2 +0 exact / +2/3 F1 -> F1 best 3 2/3 at 0.6; q3 answered "London" -1.
    assert list(at_default.values)[-4:] == ["best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]
    assert at_default["best_exact"] == 75.0 and at_default["best_exact_thresh"] == 0.1
    assert at_default["best_f1"] == pytest.approx(100 * (3 + 2 / 3) / 4)
    assert at_default["best_f1_thresh"] == 0.6

    at_half = evaluate(dataset, predictions, na_probs=na_probs, na_prob_thresh=0.5)
    # q2 (0.6) and q3 (0.8) become "no answer": q2 wrong (answerable), q3 right. exact [1, 0, 1, 1].
    assert at_half["exact"] == 75.0 and at_half["f1"] == 75.0
    assert (at_half["HasAns_exact"], at_half["NoAns_exact"]) == (50.0, 100.0)
    # best_* come from the raw scores, so the threshold does not move them.
    assert at_half["best_f1"] == at_default["best_f1"]


def test_v20_best_threshold_ties_follow_na_prob_file_order() -> None:
    """Questions with equal na_prob are swept in na-prob file order (the official stable sort), so the
    best score can sit between two tied questions, which no real threshold separates."""
    dataset, predictions, _ = _four_questions()
    q3_first = {"q1": 0.1, "q4": 0.3, "q3": 0.7, "q2": 0.7}
    q2_first = {"q1": 0.1, "q4": 0.3, "q2": 0.7, "q3": 0.7}
    assert evaluate(dataset, predictions, na_probs=q3_first)["best_f1"] == 75.0
    assert evaluate(dataset, predictions, na_probs=q2_first)["best_f1"] == pytest.approx(91.6666666)
    assert evaluate(dataset, predictions, na_probs=q2_first)["best_f1_thresh"] == 0.7


def test_v20_without_na_prob_file_uses_zero_probabilities() -> None:
    dataset, predictions, _ = _four_questions()
    # As in the official script: every prediction has na_prob 0.0, so a negative threshold abstains everywhere.
    scores = evaluate(dataset, predictions, na_prob_thresh=-0.5)
    assert (scores["exact"], scores["HasAns_exact"], scores["NoAns_exact"]) == (50.0, 0.0, 100.0)
    assert "best_exact" not in scores.values


def test_v20_missing_predictions_score_zero_in_every_total() -> None:
    dataset, predictions, na_probs = _four_questions()
    del predictions["q4"]  # an unanswerable question the official v2.0 script would crash on (KeyError)
    scores = evaluate(dataset, predictions, na_probs=na_probs)
    assert scores.missing_predictions == ["q4"]
    assert (scores["exact"], scores["total"]) == (25.0, 4)
    assert (scores["NoAns_exact"], scores["NoAns_total"]) == (0.0, 2)
    # Sweep starts at 1 (only q3 abstains correctly; q4 has nothing to abstain with); q1 +1 -> 2 of 4.
    assert scores["best_exact"] == 50.0 and scores["best_exact_thresh"] == 0.1


def test_v20_na_prob_file_must_cover_every_prediction() -> None:
    dataset, predictions, na_probs = _four_questions()
    del na_probs["q2"]
    with pytest.raises(InvalidInputError, match=r"lacks 1 answered question.*q2"):
        evaluate(dataset, predictions, na_probs=na_probs)


def test_na_probs_refused_under_v11() -> None:
    dataset = make_dataset([("q1", ["Paris"])], "1.1")
    with pytest.raises(InvalidInputError, match=r"2\.0 scoring only"):
        evaluate(dataset, {"q1": "Paris"}, na_probs={"q1": 0.5})


def test_unknown_dataset_version_needs_an_explicit_one() -> None:
    dataset = make_dataset([("q1", ["Paris"])], "3.7")
    with pytest.raises(InvalidInputError, match="cannot tell the SQuAD version"):
        evaluate(dataset, {"q1": "Paris"})
    assert evaluate(dataset, {"q1": "Paris"}, version="1.1")["exact_match"] == 100.0


# --- the reader -----------------------------------------------------------------------------------


def test_reads_dev_sets_in_file_order(dev_sets: dict[str, SquadDataset]) -> None:
    v1, v2 = dev_sets["v1.1"], dev_sets["v2.0"]
    assert (v1.version, v1.metric_version, v1.num_questions, len(v1.articles)) == ("1.1", "1.1", 10570, 48)
    assert (v2.version, v2.metric_version, v2.num_questions, len(v2.articles)) == ("v2.0", "2.0", 11873, 35)
    paragraph, first = next(v1.questions())
    assert first.id == "56be4db0acb8001400a502ec" and first.answers[0].text == "Denver Broncos"
    assert paragraph.context[first.answers[0].answer_start :].startswith("Denver Broncos")
    assert sum(q.has_answer for _, q in v2.questions()) == 5928
    assert all(q.is_impossible is not q.has_answer for _, q in v2.questions())
    assert v1.raw_articles[0]["paragraphs"][0]["qas"][0]["id"] == first.id


def test_questions_limit_and_head(dev_sets: dict[str, SquadDataset]) -> None:
    v2 = dev_sets["v2.0"]
    first_20 = [q.id for _, q in v2.questions(limit=20)]
    assert first_20 == [q.id for _, q in v2.questions()][:20]
    head = v2.head(20)
    assert [q.id for _, q in head.questions()] == first_20
    assert head.num_questions == 20 and head.version == "v2.0"
    assert sum(len(p["qas"]) for a in head.raw_articles for p in a["paragraphs"]) == 20
    assert v2.head(0).num_questions == 0
    assert v2.head(10**6).num_questions == 11873
    with pytest.raises(InvalidInputError, match="limit must be >= 0"):
        list(v2.questions(limit=-1))


def test_predictions_and_na_probs_round_trip(tmp_path: Path) -> None:
    predictions = {"b": "Théâtre “x”", "a": ""}
    for name in ("preds.json", "preds.json.gz"):
        write_predictions(tmp_path / name, predictions)
        read_back = read_predictions(tmp_path / name)
        assert read_back == predictions and list(read_back) == ["b", "a"]
    assert gzip.decompress((tmp_path / "preds.json.gz").read_bytes()).startswith(b"{")
    write_na_probs(tmp_path / "na.json", {"a": 0.25, "b": 1})
    assert read_na_probs(tmp_path / "na.json") == {"a": 0.25, "b": 1}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[1, 2]", "top level is a list"),
        (b'{"version": "1.1"}', "no 'data' list"),
        (b'{"version": 1.1, "data": []}', "'version' must be a string"),
        (b'{"data": [{"title": "t"}]}', r"data\[0\] has no 'paragraphs' list"),
        (b'{"data": [{"paragraphs": [{"qas": []}]}]}', r"data\[0\].paragraphs\[0\] has no 'context'"),
        (
            b'{"data": [{"paragraphs": [{"context": "c", "qas": [{"id": 7, "question": "q", "answers": []}]}]}]}',
            r"qas\[0\].id must be a string, got a number",
        ),
        (
            b'{"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "x", "question": "q", '
            b'"answers": [{"text": "c", "answer_start": "0"}]}]}]}]}',
            r"answers\[0\].answer_start must be an integer, got a string",
        ),
        (b'{"data": [', "is not valid JSON"),
        (b'{"data": "\xff"}', "is not UTF-8 text"),
    ],
)
def test_malformed_dataset_is_one_clear_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "data.json"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match=message) as info:
        read_dataset(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_bad_gzip_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="SQuAD dataset file not found"):
        read_dataset(tmp_path / "nope.json")
    (tmp_path / "plain.json.gz").write_bytes(b'{"data": []}')
    with pytest.raises(InvalidInputError, match="not valid gzip data"):
        read_dataset(tmp_path / "plain.json.gz")
    whole = gzip.compress(b'{"version": "1.1", "data": []}')
    (tmp_path / "cut.json.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InvalidInputError, match="not valid gzip data"):
        read_dataset(tmp_path / "cut.json.gz")


def test_predictions_must_map_ids_to_strings(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('["Paris"]')
    with pytest.raises(InvalidInputError, match="must hold a JSON object"):
        read_predictions(path)
    path.write_text('{"q1": 3}')
    with pytest.raises(InvalidInputError, match="answer of 'q1' must be a string"):
        read_predictions(path)
    path.write_text('{"q1": "yes"}')
    with pytest.raises(InvalidInputError, match="value of 'q1' must be a number"):
        read_na_probs(path)
