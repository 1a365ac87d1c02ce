"""Synthetic unanswerable questions, made from SQuAD v1.1 alone (no v2.0 training data).

A negative is a training question paired with a paragraph it was not asked about: by default a paragraph of a
*different* article (`other_article`), or another paragraph of its own article (`same_article`, closer in topic,
hence harder). A paragraph that contains one of the question's gold answer texts (case-insensitive) is never
used, so a negative is unanswerable as far as plain string matching can tell. Every window of a negative targets
[CLS] (0, 0): the "no answer" the runtime reads from the [CLS] logits when `DecoderConfig.allow_null` is on.
Windows come from `qacore.features.Featurizer`, as for the positives in `training.data`.
"""

from __future__ import annotations

import json
import lzma
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from realtime_qa.qacore.errors import InvalidInputError
from realtime_qa.qacore.features import EncodedPassage, Featurizer, Window
from realtime_qa.qacore.squad import Article, Question
from realtime_qa.training.config import HARD_NEGATIVE_KINDS, NEGATIVE_SOURCES
from realtime_qa.training.data import WindowArrays, stack_windows

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


# --- Harder negatives (issue 11): each looks answerable from the very paragraph it is asked of. ---------------
#
# Made as text (question, context) from SQuAD v1.1 train alone, so they can be prepared once on any machine and
# carried to the GPU as xz-compressed JSONL; `example_windows` featurizes them there with the runtime's featurizer.
#   sentence_removed  the question's own paragraph without the sentence(s) holding the answer; the question's
#                     entities usually stay in view in the other sentences
#   entity_swap       the question with one of its entities (year, number, month date, capitalised name) that the
#                     paragraph mentions swapped for another of the same kind from the article, absent from the
#                     paragraph, asked of its own paragraph
#   negation          the question negated ("did X not ...", "was not ...") or with a word swapped for its antonym
#                     (first/last, largest/smallest, ...) that the paragraph does not use, asked of its own paragraph
#   bm25_distractor   the question asked of the other paragraph of its article that shares most with it by BM25,
#                     among those that hold none of its gold answer texts

HARD_KINDS = HARD_NEGATIVE_KINDS

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"“'(\[]?[A-Z0-9])")
_WORD = re.compile(r"\w+", re.UNICODE)
_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_ENTITY_PATTERNS = (
    (
        "month_date",
        re.compile(rf"\b(?:(?:{_MONTHS})\s+\d{{1,2}}(?:,\s*\d{{4}})?|\d{{1,2}}\s+(?:{_MONTHS})(?:\s+\d{{4}})?)\b"),
    ),
    ("year", re.compile(r"\b(?:1[0-9]{3}|20[0-9]{2})s?\b")),
    ("number", re.compile(r"\b\d{1,3}(?:,\d{3})+(?:\.\d+)?\b|\b\d+(?:\.\d+)?\b")),
    ("name", re.compile(r"\b[A-Z][\w'’-]*(?:\s+(?:of|the|de|del|la|von|van|and)?\s*[A-Z][\w'’-]*)*")),
)


def _word_set(words: str) -> frozenset[str]:
    return frozenset(words.split())


# Capitalised words that are not names (sentence starts, question words).
_NOT_NAMES = _word_set(
    "a an the this that these those it its he she they his her their we our i in on at by for from of to with as "
    "after before during when while where what which who whom whose why how is was are were do does did can "
    "could will would should has have had there here however although though because since also many some most "
    "one two three four five six seven eight nine ten first second third last if but and or not no yes"
)
_STOPWORDS = _NOT_NAMES | _word_set("be been being into than then so such about over under between other")
_BE_VERBS = re.compile(r"\b(is|was|are|were)\b(?! not\b)", re.IGNORECASE)
_DO_VERBS = re.compile(r"\b(did|does|do)\b", re.IGNORECASE)
_DETERMINERS = _word_set("the a an his her their its this that these those")
_ANTONYMS = {
    "first": "last", "last": "first", "largest": "smallest", "smallest": "largest", "biggest": "smallest",
    "most": "least", "least": "most", "highest": "lowest", "lowest": "highest", "longest": "shortest",
    "shortest": "longest", "earliest": "latest", "latest": "earliest", "oldest": "youngest",
    "youngest": "oldest", "before": "after", "after": "before", "increase": "decrease",
    "decrease": "increase", "increased": "decreased", "decreased": "increased", "more": "less", "less": "more",
    "maximum": "minimum", "minimum": "maximum", "best": "worst", "worst": "best", "won": "lost", "lost": "won",
    "north": "south", "south": "north", "east": "west", "west": "east", "above": "below", "below": "above",
    "major": "minor", "minor": "major", "early": "late", "late": "early", "began": "ended", "ended": "began",
    "largely": "rarely", "larger": "smaller", "smaller": "larger", "higher": "lower", "lower": "higher",
}  # fmt: skip
BM25_K1 = 1.5
BM25_B = 0.75


@dataclass(frozen=True)
class NegativeExample:
    """One unanswerable training question as text: `question` asked of `context` (made by generator `kind` from
    train question `source_id`)."""

    kind: str
    source_id: str
    question: str
    context: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


@dataclass
class HardNegativeStats:
    attempted: dict[str, int] = field(default_factory=dict)  # questions drawn for each kind
    made: dict[str, int] = field(default_factory=dict)  # negatives made of each kind (the rest found no rewrite)


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of `text` (a plain punctuation split: good enough to drop one sentence)."""
    spans, begin = [], 0
    for match in _SENTENCE_END.finditer(text):
        spans.append((begin, match.start() + len(match.group(0).rstrip())))
        begin = match.end()
    if begin < len(text):
        spans.append((begin, len(text)))
    return [(start, end) for start, end in spans if text[start:end].strip()]


def _holds_gold(context: str, question: Question) -> bool:
    lowered = context.lower()
    return any(answer.text.strip() and answer.text.lower() in lowered for answer in question.answers)


def remove_answer_sentence(context: str, question: Question) -> str | None:
    """`context` without every sentence that overlaps a gold answer span; None when nothing would be left or a
    gold answer text still appears in what is left."""
    answer_spans = [(a.answer_start, a.answer_start + len(a.text)) for a in question.answers if a.text.strip()]
    if not answer_spans:
        return None
    kept = [
        context[start:end]
        for start, end in sentence_spans(context)
        if not any(start < answer_end and answer_start < end for answer_start, answer_end in answer_spans)
    ]
    rest = " ".join(sentence.strip() for sentence in kept)
    if not rest or _holds_gold(rest, question):
        return None
    return rest


def find_entities(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of the entities of `text`, by pattern: month dates, years, numbers, capitalised names
    (a leading non-name word such as "The" or "What" is dropped). Spans do not overlap; earlier kinds win."""
    taken = np.zeros(len(text) + 1, dtype=bool)
    found: list[tuple[int, int, str]] = []
    for kind, pattern in _ENTITY_PATTERNS:
        for match in pattern.finditer(text):
            start, end = match.span()
            if kind == "name":
                words = match.group(0).split()
                while words and words[0].lower() in _NOT_NAMES:
                    start = text.index(words[0], start) + len(words[0])
                    words = words[1:]
                if not words:
                    continue
                start = text.index(words[0], start)
                if len(words) == 1 and words[0].lower() in _STOPWORDS:
                    continue
            if taken[start:end].any():
                continue
            taken[start:end] = True
            found.append((start, end, kind))
    return sorted(found)


def _entity_shape(text: str, kind: str) -> tuple[str, int]:
    return kind, (len(text.split()) if kind == "name" else 0)


def article_entities(contexts: Sequence[str]) -> list[tuple[str, str]]:
    """(text, kind) of every distinct entity of an article's paragraphs (the pool `swap_entity` draws from)."""
    seen: dict[tuple[str, str], None] = {}
    for text in contexts:
        for start, end, kind in find_entities(text):
            seen.setdefault((text[start:end], kind), None)
    return list(seen)


def swap_entity(
    question: str, context: str, entities: Sequence[tuple[str, str]], rng: np.random.Generator
) -> str | None:
    """`question` with one entity that `context` mentions replaced by an entity of the same kind (and, for names,
    the same number of words) from `entities` (`article_entities` of its article) that `context` does not
    mention; None when there is none."""
    lowered = context.lower()
    own = [
        (start, end, kind)
        for start, end, kind in find_entities(question)
        if question[start:end].lower() in lowered and start > 0
    ]
    if not own:
        return None
    for index in rng.permutation(len(own)):
        start, end, kind = own[int(index)]
        shape = _entity_shape(question[start:end], kind)
        options = sorted(
            {text for text, other in entities if _entity_shape(text, other) == shape and text.lower() not in lowered}
        )
        if options:
            replacement = options[int(rng.integers(len(options)))]
            return question[:start] + replacement + question[end:]
    return None


def negate_question(question: str, context: str, rng: np.random.Generator) -> str | None:
    """`question` negated ("was" -> "was not"; "did X build" -> "did X not build") or with one word swapped for
    its antonym when the paragraph does not use that antonym (else the flipped question may well be answerable);
    None when neither applies."""
    options: list[str] = []
    be = _BE_VERBS.search(question)
    if be:
        options.append(question[: be.end()] + " not" + question[be.end() :])
    do = _DO_VERBS.search(question)
    if do:
        words = list(re.finditer(r"\S+", question[do.end() :]))
        for position, word in enumerate(words):
            token = word.group(0)
            if position == 0 or token[0].isupper() or token.lower() in _DETERMINERS or not token[0].isalpha():
                continue
            at = do.end() + word.start()
            options.append(question[:at] + "not " + question[at:])
            break
    context_words = {word.lower() for word in _WORD.findall(context)}
    for match in _WORD.finditer(question):
        antonym = _ANTONYMS.get(match.group(0).lower())
        if antonym and antonym not in context_words:
            replacement = antonym.capitalize() if match.group(0)[0].isupper() else antonym
            options.append(question[: match.start()] + replacement + question[match.end() :])
    if not options:
        return None
    return options[int(rng.integers(len(options)))]


def _terms(text: str) -> list[str]:
    return [word for word in (w.lower() for w in _WORD.findall(text)) if word not in _STOPWORDS]


class Bm25:
    """Okapi BM25 over a small collection (the paragraphs of one article)."""

    def __init__(self, documents: Sequence[str]) -> None:
        self.counts = [Counter(_terms(document)) for document in documents]
        self.lengths = np.array([sum(count.values()) for count in self.counts], dtype=np.float64)
        self.mean_length = float(self.lengths.mean()) if len(documents) else 0.0
        frequency: Counter[str] = Counter()
        for count in self.counts:
            frequency.update(count.keys())
        n = len(documents)
        self.idf = {term: math.log(1.0 + (n - df + 0.5) / (df + 0.5)) for term, df in frequency.items()}

    def scores(self, query: str) -> np.ndarray:
        terms = set(_terms(query))
        out = np.zeros(len(self.counts))
        for index, count in enumerate(self.counts):
            norm = BM25_K1 * (1 - BM25_B + BM25_B * self.lengths[index] / max(self.mean_length, 1e-9))
            for term in terms:
                tf = count.get(term, 0)
                if tf:
                    out[index] += self.idf[term] * tf * (BM25_K1 + 1) / (tf + norm)
        return out


def bm25_distractor(question: Question, own_paragraph: int, article: Article, index: Bm25 | None = None) -> str | None:
    """The paragraph of `article` (not the question's own) with the highest BM25 score for the question among those
    that hold none of its gold answer texts and share at least one term with it; None when there is none."""
    index = index or Bm25([paragraph.context for paragraph in article.paragraphs])
    scores = index.scores(question.question)
    for candidate in np.argsort(-scores, kind="stable"):
        candidate = int(candidate)
        if scores[candidate] <= 0:
            return None
        context = article.paragraphs[candidate].context
        if candidate != own_paragraph and not _holds_gold(context, question):
            return context
    return None


def hard_negatives(
    articles: Sequence[Article], kinds: Sequence[str], rate: float, seed: int
) -> tuple[list[NegativeExample], HardNegativeStats]:
    """For each kind, a seeded draw of about `rate` of the training questions (each kind its own draw), and the
    negative that kind makes of each (where it can make one)."""
    unknown = sorted(set(kinds) - set(HARD_KINDS))
    if unknown:
        raise InvalidInputError(f"negative kinds must be among {HARD_KINDS}, got {unknown}")
    if not 0.0 < rate <= 1.0:
        raise InvalidInputError(f"negatives per question must be in (0, 1], got {rate}")
    owners = [
        (article_index, paragraph_index, question)
        for article_index, article in enumerate(articles)
        for paragraph_index, paragraph in enumerate(article.paragraphs)
        for question in paragraph.questions
    ]
    stats = HardNegativeStats()
    examples: list[NegativeExample] = []
    indexes: dict[int, Bm25] = {}
    entities: dict[int, list[tuple[str, str]]] = {}
    for kind_number, kind in enumerate(HARD_KINDS):
        if kind not in kinds:
            continue
        rng = np.random.default_rng([seed, kind_number])
        chosen = np.sort(rng.choice(len(owners), size=round(rate * len(owners)), replace=False))
        stats.attempted[kind] = len(chosen)
        made = 0
        for row in chosen:
            article_index, paragraph_index, question = owners[int(row)]
            article = articles[article_index]
            context = article.paragraphs[paragraph_index].context
            text, asked_of = question.question, context
            if kind == "sentence_removed":
                asked_of = remove_answer_sentence(context, question)  # type: ignore[assignment]
            elif kind == "entity_swap":
                if article_index not in entities:
                    entities[article_index] = article_entities([p.context for p in article.paragraphs])
                text = swap_entity(text, context, entities[article_index], rng)  # type: ignore[assignment]
            elif kind == "negation":
                text = negate_question(text, context, rng)  # type: ignore[assignment]
            else:
                if article_index not in indexes:
                    indexes[article_index] = Bm25([p.context for p in article.paragraphs])
                asked_of = bm25_distractor(question, paragraph_index, article, indexes[article_index])  # type: ignore[assignment]
            if text is None or asked_of is None:
                continue
            examples.append(NegativeExample(kind, question.id, text, asked_of))
            made += 1
        stats.made[kind] = made
    return examples, stats


def write_examples(path: Path, examples: Sequence[NegativeExample]) -> None:
    """JSONL, one example a line, xz-compressed with a dictionary large enough to fold the many repeated
    paragraphs (a third of the size gzip reaches: what travels to the GPU machine must stay small)."""
    data = "".join(example.to_json() + "\n" for example in examples).encode("utf-8")
    path.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))


def read_examples(path: Path, kinds: Sequence[str] | None = None) -> list[NegativeExample]:
    """The examples of `write_examples`, only those of `kinds` when given."""
    examples = []
    for line in lzma.decompress(path.read_bytes()).decode("utf-8").splitlines():
        example = NegativeExample(**json.loads(line))
        if kinds is None or example.kind in kinds:
            examples.append(example)
    return examples


def example_windows(examples: Sequence[NegativeExample], featurizer: Featurizer) -> tuple[WindowArrays, NegativeStats]:
    """Every window of every example, each targeting [CLS] (0, 0)."""
    stats = NegativeStats()
    passages: dict[str, EncodedPassage] = {}
    windows: list[Window] = []
    for example in examples:
        if example.context not in passages:
            passages[example.context] = featurizer.encode_passage(example.context)
        try:
            features = featurizer.featurize(example.question, passages[example.context])
        except InvalidInputError:
            stats.skipped_questions += 1
            continue
        stats.questions += 1
        windows.extend(features.windows)
    stats.windows = len(windows)
    arrays = stack_windows(
        windows, [(0, 0)] * len(windows), featurizer.config.max_seq_length, featurizer.special.pad_id
    )
    return arrays, stats
