"""Featurization against reference implementations, on the whole SQuAD v1.1 dev set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from realtime_qa.qacore.errors import InvalidInputError
from realtime_qa.qacore.features import (
    MAX_PASSAGE_CHARS,
    Featurizer,
    FeaturizerConfig,
    answer_positions,
    char_span_to_token_span,
    featurizer_config_for,
    max_context_windows,
    window_spans,
)
from realtime_qa.qacore.squad import Question, SquadDataset, read_dataset
from realtime_qa.qacore.squad_metric import normalize_answer
from realtime_qa.qacore.tokenization import load_tokenizer


@pytest.fixture(scope="module")
def featurizer(shipped_model_dir: Path) -> Featurizer:
    return Featurizer(load_tokenizer(shipped_model_dir))


@pytest.fixture(scope="module")
def dev(squad_dir: Path) -> SquadDataset:
    return read_dataset(squad_dir / "dev-v1.1.json.gz")


def reference_is_max_context(spans: list[tuple[int, int]], cur_span_index: int, position: int) -> bool:
    """Google BERT's `_check_is_max_context`, written out as in the original run_squad.py."""
    best_score = None
    best_span_index = None
    for span_index, (start, length) in enumerate(spans):
        end = start + length - 1
        if position < start or position > end:
            continue
        num_left_context = position - start
        num_right_context = end - position
        score = min(num_left_context, num_right_context) + 0.01 * length
        if best_score is None or score > best_score:
            best_score = score
            best_span_index = span_index
    return cur_span_index == best_span_index


def test_tokenizer_decodes_real_words_not_unk(featurizer: Featurizer) -> None:
    # transformers 5's BertTokenizerFast(vocab_file=...) once turned every token into [UNK]: guard against it.
    passage = featurizer.encode_passage("The Denver Broncos defeated the Carolina Panthers 24-10.")
    decoded = featurizer.tokenizer.decode(passage.token_ids.tolist())
    assert decoded == "the denver broncos defeated the carolina panthers 24 - 10."
    assert featurizer.tokenizer.token_to_id("[UNK]") not in passage.token_ids


def test_windows_match_reference_stride_and_max_context_on_long_passages(featurizer: Featurizer) -> None:
    config = FeaturizerConfig(max_seq_length=128, doc_stride=32, max_query_length=16)
    small = Featurizer(featurizer.tokenizer, config)
    passage = small.encode_passage(" ".join(f"word{i} is number {i}." for i in range(300)))
    question = small.encode_question("Which word is number seven and what comes after it in the list?")
    windows = small.windows(question, passage)
    spans = [(w.passage_start, w.length) for w in windows]
    assert len(windows) > 10
    # Every window is full except perhaps the last, starts doc_stride after the previous one, and covers the end.
    budget = 128 - len(question) - 3
    assert all(length == budget for _, length in spans[:-1])
    assert [start for start, _ in spans] == list(range(0, 32 * len(spans), 32))
    assert spans[-1][0] + spans[-1][1] == len(passage)
    for index, window in enumerate(windows):
        assert window.seq_len <= 128
        assert window.input_ids[0] == small.special.cls_id and window.input_ids[-1] == small.special.sep_id
        expected = [reference_is_max_context(spans, index, window.passage_start + i) for i in range(window.length)]
        assert window.max_context.tolist() == expected
    # Each passage token is max-context in exactly one window.
    assert (max_context_windows(len(passage), spans) >= 0).all()


@pytest.mark.slow
def test_every_dev_answer_is_recovered_from_its_token_span(featurizer: Featurizer, dev: SquadDataset) -> None:
    """char span -> token span -> window positions -> char span, for all 34,726 dev answers."""
    total = exact = normalized = 0
    for paragraph, question_group in _paragraphs(dev):
        passage = featurizer.encode_passage(paragraph)
        for question in question_group:
            windows = featurizer.windows(featurizer.encode_question(question.question), passage)
            for answer in question.answers:
                total += 1
                begin, end = answer.answer_start, answer.answer_start + len(answer.text)
                assert paragraph[begin:end] == answer.text
                span = char_span_to_token_span(passage, begin, end)
                assert span is not None
                containing = [w for w in windows if answer_positions(w, span) != (0, 0)]
                assert containing, f"answer {answer.text!r} lies in no window"
                window = containing[0]
                start, stop = answer_positions(window, span)
                offsets = passage.offsets[window.passage_start - window.context_offset + np.array([start, stop])]
                recovered = paragraph[offsets[0, 0] : offsets[1, 1]]
                exact += recovered == answer.text
                normalized += normalize_answer(recovered) == normalize_answer(answer.text)
    assert total == 34_726
    # The rest are answers that cut through a word piece ("1990" of "1990s"): a token span cannot say less.
    assert normalized / total > 0.99, (exact, normalized, total)
    assert exact / total > 0.97, (exact, normalized, total)


def _paragraphs(dataset: SquadDataset) -> Iterator[tuple[str, tuple[Question, ...]]]:
    for article in dataset.articles:
        for paragraph in article.paragraphs:
            yield paragraph.context, paragraph.questions


def test_windows_match_huggingface_overflowing_tokens(
    featurizer: Featurizer, dev: SquadDataset, shipped_model_dir: Path
) -> None:
    """Our doc_stride (step between windows) equals HF's overlap `stride = window budget - doc_stride`."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(shipped_model_dir / "tokenizer.json"),
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )
    config = FeaturizerConfig(max_seq_length=192, doc_stride=64, max_query_length=64)
    small = Featurizer(featurizer.tokenizer, config)
    checked = 0
    for paragraph, questions in list(_paragraphs(dev))[:150]:
        question = questions[0].question
        question_ids = small.encode_question(question)
        windows = small.windows(question_ids, small.encode_passage(paragraph))
        budget = config.max_seq_length - len(question_ids) - 3
        encoded = reference(
            question,
            paragraph,
            truncation="only_second",
            max_length=config.max_seq_length,
            stride=budget - config.doc_stride,
            return_overflowing_tokens=True,
        )
        ours = [w.input_ids.tolist() for w in windows]
        theirs = encoded["input_ids"]
        # HF may add a last window that only repeats tokens already covered; ours stops at the passage end.
        assert theirs[: len(ours)] == ours
        checked += len(ours)
    assert checked > 150


def test_featurizer_config_for_short_engines_fits() -> None:
    config = featurizer_config_for(128)
    assert config.max_seq_length == 128 and config.max_query_length + config.doc_stride + 3 <= 128
    assert featurizer_config_for(512).max_seq_length == 384


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_seq_length": 8}, "max_seq_length"),
        ({"max_seq_length": 100_000}, "max_seq_length"),
        ({"max_query_length": 0}, "max_query_length"),
        ({"doc_stride": 0}, "doc_stride"),
        ({"doc_stride": 1000}, "doc_stride"),
    ],
)
def test_absurd_featurizer_options_are_refused(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        FeaturizerConfig(**kwargs)


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_question_and_passage_are_refused(featurizer: Featurizer, text: str) -> None:
    with pytest.raises(InvalidInputError, match="question is empty"):
        featurizer.encode_question(text)
    with pytest.raises(InvalidInputError, match="passage is empty"):
        featurizer.encode_passage(text)


def test_passage_over_the_documented_limit_is_refused(featurizer: Featurizer) -> None:
    with pytest.raises(InvalidInputError, match="limit"):
        featurizer.encode_passage("a" * (MAX_PASSAGE_CHARS + 1))


def test_window_spans_cover_everything_once_the_stride_is_small() -> None:
    spans = window_spans(1000, 300, 7)
    covered = np.zeros(1000, bool)
    for start, length in spans:
        covered[start : start + length] = True
    assert covered.all() and spans[-1][0] + spans[-1][1] == 1000
