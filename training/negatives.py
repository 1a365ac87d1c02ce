"""Synthetic unanswerable questions, made from SQuAD v1.1 alone (no v2.0 training data).

A negative is a training question paired with a paragraph it was not asked about: by default a paragraph of a
*different* article (`other_article`), or another paragraph of its own article (`same_article`, closer in topic,
hence harder). A paragraph that contains one of the question's gold answer texts (case-insensitive) is never
used, so a negative is unanswerable as far as plain string matching can tell. Every window of a negative targets
[CLS] (0, 0): the "no answer" the runtime reads from the [CLS] logits when `DecoderConfig.allow_null` is on.
Windows come from `qacore.features.Featurizer`, as for the positives in `training.data`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qacore.errors import InvalidInputError
from qacore.features import EncodedPassage, Featurizer, Window
from qacore.squad import Article, Question
from training.config import NEGATIVE_SOURCES
from training.data import WindowArrays, stack_windows

MAX_DRAWS = 8  # paragraphs tried per negative before it is given up (all held the answer text)


@dataclass(frozen=True)
class Negative:
    """One synthetic unanswerable question: `question` of article `question_article`, asked of a paragraph
    (`article`, `paragraph`) it was not written for."""

    question: Question
    question_article: int
    article: int
    paragraph: int


@dataclass
class NegativeStats:
    questions: int = 0  # negatives kept
    windows: int = 0
    no_clean_paragraph: int = 0  # every paragraph drawn held a gold answer text: no negative made
    skipped_questions: int = 0  # questions the runtime refuses (InvalidInputError), left out


def sample_negatives(
    articles: Sequence[Article], per_question: float, source: str, seed: int
) -> tuple[list[Negative], int]:
    """About `per_question` negatives per training question (each question at most once), and how many drawn
    questions found no paragraph free of their answer text."""
    if source not in NEGATIVE_SOURCES:
        raise InvalidInputError(f"negative source must be one of {NEGATIVE_SOURCES}, got {source!r}")
    if not 0.0 < per_question <= 1.0:
        raise InvalidInputError(f"negatives per question must be in (0, 1], got {per_question}")
    owners = [
        (article_index, question)
        for article_index, article in enumerate(articles)
        for paragraph in article.paragraphs
        for question in paragraph.questions
    ]
    if len(articles) < 2 and source == "other_article":
        raise InvalidInputError("negatives from other articles need at least two articles")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(owners), size=round(per_question * len(owners)), replace=False))
    negatives: list[Negative] = []
    given_up = 0
    for index in chosen:
        article_index, question = owners[int(index)]
        golds = [answer.text.lower() for answer in question.answers if answer.text.strip()]
        for _ in range(MAX_DRAWS):
            target_article, target_paragraph = _draw_paragraph(articles, article_index, question, source, rng)
            if target_article < 0:
                break
            context = articles[target_article].paragraphs[target_paragraph].context.lower()
            if not any(gold in context for gold in golds):
                negatives.append(Negative(question, article_index, target_article, target_paragraph))
                break
        else:
            given_up += 1
    return negatives, given_up


def _draw_paragraph(
    articles: Sequence[Article], own_article: int, question: Question, source: str, rng: np.random.Generator
) -> tuple[int, int]:
    """(article, paragraph) of a paragraph `question` was not asked about; (-1, -1) when there is none."""
    if source == "other_article":
        article = int(rng.integers(len(articles) - 1))
        article += article >= own_article  # any article but the question's own
        return article, int(rng.integers(len(articles[article].paragraphs)))
    paragraphs = articles[own_article].paragraphs
    others = [index for index, paragraph in enumerate(paragraphs) if question not in paragraph.questions]
    if not others:
        return -1, -1
    return own_article, others[int(rng.integers(len(others)))]


def negative_windows(
    articles: Sequence[Article], featurizer: Featurizer, per_question: float, source: str, seed: int
) -> tuple[WindowArrays, NegativeStats]:
    """Every window of every sampled negative, each targeting [CLS] (0, 0)."""
    negatives, given_up = sample_negatives(articles, per_question, source, seed)
    stats = NegativeStats(no_clean_paragraph=given_up)
    passages: dict[tuple[int, int], EncodedPassage] = {}
    windows: list[Window] = []
    for negative in negatives:
        key = (negative.article, negative.paragraph)
        if key not in passages:
            passages[key] = featurizer.encode_passage(articles[key[0]].paragraphs[key[1]].context)
        try:
            features = featurizer.featurize(negative.question.question, passages[key])
        except InvalidInputError:  # as in training.data.train_windows: the few questions the runtime refuses
            stats.skipped_questions += 1
            continue
        stats.questions += 1
        windows.extend(features.windows)
    stats.windows = len(windows)
    arrays = stack_windows(
        windows, [(0, 0)] * len(windows), featurizer.config.max_seq_length, featurizer.special.pad_id
    )
    return arrays, stats
