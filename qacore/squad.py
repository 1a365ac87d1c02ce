"""Reading SQuAD v1.1 / v2.0 dataset files, and the prediction and no-answer-probability files scored against them.

A dataset is read once into frozen dataclasses (article -> paragraph -> question) in file order; the
metric (`qacore.squad_metric`) and the engine evaluation both walk it in that order. The raw `data`
list is kept beside the typed form for tools that need fields this reader does not model.
Every malformed input raises `InvalidInputError` with a one-line message naming the file and the place.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from realtime_qa.qacore.errors import InvalidInputError
from realtime_qa.qacore.files import read_bytes

# The two scoring rules the official scripts define; `version` fields such as "v2.0" map onto them.
METRIC_VERSIONS = ("1.1", "2.0")
# Halves of a dataset by article (`SquadDataset.article_half`): tune on one, report on the other.
ARTICLE_HALVES = ("first", "second")


@dataclass(frozen=True)
class Answer:
    text: str
    answer_start: int


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answers: tuple[Answer, ...]
    is_impossible: bool = False

    @property
    def has_answer(self) -> bool:
        """Answerable in the sense of the official v2.0 script: at least one gold answer is listed."""
        return bool(self.answers)

    @property
    def answer_texts(self) -> list[str]:
        return [answer.text for answer in self.answers]


@dataclass(frozen=True)
class Paragraph:
    context: str
    questions: tuple[Question, ...]


@dataclass(frozen=True)
class Article:
    title: str
    paragraphs: tuple[Paragraph, ...]


@dataclass(frozen=True, eq=False)
class SquadDataset:
    """A SQuAD file: its `version` field as written (e.g. "1.1", "v2.0") and its articles in file order."""

    version: str
    articles: tuple[Article, ...]
    raw_articles: list[dict[str, Any]] = field(default_factory=list, repr=False)
    source: str = "<memory>"

    @property
    def metric_version(self) -> str | None:
        """ "1.1" or "2.0" when the `version` field names one of the official scoring rules, else None."""
        stripped = self.version.strip().lower().removeprefix("v")
        return stripped if stripped in METRIC_VERSIONS else None

    @property
    def num_questions(self) -> int:
        return sum(len(paragraph.questions) for article in self.articles for paragraph in article.paragraphs)

    def questions(self, limit: int | None = None) -> Iterator[tuple[Paragraph, Question]]:
        """(paragraph, question) pairs in file order, at most `limit` of them."""
        if limit is not None and limit < 0:
            raise InvalidInputError(f"limit must be >= 0, got {limit}")
        count = 0
        for article in self.articles:
            for paragraph in article.paragraphs:
                for question in paragraph.questions:
                    if limit is not None and count >= limit:
                        return
                    yield paragraph, question
                    count += 1

    def head(self, limit: int) -> SquadDataset:
        """The dataset cut to its first `limit` questions in file order (emptied paragraphs and articles dropped),
        so that a partial run is scored over exactly the questions it answered."""
        if limit < 0:
            raise InvalidInputError(f"limit must be >= 0, got {limit}")
        remaining = limit
        articles: list[Article] = []
        raw_articles: list[dict[str, Any]] = []
        for article, raw_article in zip(self.articles, self._raw_or_rebuilt(), strict=True):
            if remaining == 0:
                break
            paragraphs: list[Paragraph] = []
            raw_paragraphs: list[dict[str, Any]] = []
            for paragraph, raw_paragraph in zip(article.paragraphs, raw_article["paragraphs"], strict=True):
                if remaining == 0:
                    break
                kept = paragraph.questions[:remaining]
                remaining -= len(kept)
                if kept:
                    paragraphs.append(Paragraph(paragraph.context, kept))
                    raw_paragraphs.append({**raw_paragraph, "qas": raw_paragraph["qas"][: len(kept)]})
            if paragraphs:
                articles.append(Article(article.title, tuple(paragraphs)))
                raw_articles.append({**raw_article, "paragraphs": raw_paragraphs})
        return SquadDataset(self.version, tuple(articles), raw_articles, self.source)

    def article_half(self, which: str) -> SquadDataset:
        """The first or the second half of the articles in file order ("first": the first len // 2 articles,
        "second": the rest), so that a threshold tuned on one half can be reported on the other."""
        if which not in ARTICLE_HALVES:
            raise InvalidInputError(f"article half must be one of {ARTICLE_HALVES}, got {which!r}")
        middle = len(self.articles) // 2
        chosen = slice(0, middle) if which == "first" else slice(middle, None)
        return SquadDataset(self.version, self.articles[chosen], self._raw_or_rebuilt()[chosen], self.source)

    def _raw_or_rebuilt(self) -> list[dict[str, Any]]:
        return self.raw_articles if self.raw_articles else [_article_to_raw(article) for article in self.articles]

    @classmethod
    def from_json_obj(cls, obj: Any, source: str = "<memory>") -> SquadDataset:
        """Validate a parsed SQuAD JSON document and build the typed form."""
        if not isinstance(obj, dict):
            raise InvalidInputError(f"{source}: not a SQuAD dataset (top level is {_kind(obj)}, expected an object)")
        if "data" not in obj:
            raise InvalidInputError(f"{source}: not a SQuAD dataset (no 'data' list)")
        version = obj.get("version", "")
        if not isinstance(version, str):
            raise InvalidInputError(f"{source}: 'version' must be a string, got {_kind(version)}")
        data = obj["data"]
        if not isinstance(data, list):
            raise InvalidInputError(f"{source}: 'data' must be a list, got {_kind(data)}")
        articles = tuple(_parse_article(raw, f"{source}: data[{index}]") for index, raw in enumerate(data))
        return cls(version=version, articles=articles, raw_articles=data, source=source)


def read_dataset(path: Path) -> SquadDataset:
    """Read a SQuAD dataset file (`.json`, or gzipped `.json.gz`)."""
    return SquadDataset.from_json_obj(read_json(path, "SQuAD dataset"), source=str(path))


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file, gunzipping it when it is gzip data (by content, whatever its name)."""
    raw = read_bytes(path, what)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise InvalidInputError(f"{what} file {path} is not valid gzip data: {exc}") from None
    elif path.suffix == ".gz":
        raise InvalidInputError(f"{what} file {path} is not valid gzip data (no gzip header)")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{what} file {path} is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{what} file {path} is not UTF-8 text: {exc.reason}") from None
    except RecursionError:  # the C parser recurses once per nesting level
        raise InvalidInputError(f"{what} file {path} is nested too deeply to be a {what}") from None


def read_predictions(path: Path) -> dict[str, str]:
    """Read a predictions file: one JSON object {question id: answer text} ("" means no answer)."""
    obj = read_json(path, "predictions")
    if not isinstance(obj, dict):
        raise InvalidInputError(f"predictions file {path} must hold a JSON object {{id: answer}}, got {_kind(obj)}")
    for qid, text in obj.items():
        if not isinstance(text, str):
            raise InvalidInputError(f"predictions file {path}: answer of {qid!r} must be a string, got {_kind(text)}")
    return obj


def read_na_probs(path: Path) -> dict[str, float]:
    """Read a no-answer probability file: one JSON object {question id: probability that there is no answer}."""
    obj = read_json(path, "na-prob")
    if not isinstance(obj, dict):
        raise InvalidInputError(f"na-prob file {path} must hold a JSON object {{id: probability}}, got {_kind(obj)}")
    for qid, value in obj.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise InvalidInputError(f"na-prob file {path}: value of {qid!r} must be a number, got {value!r}")
    return obj


def write_predictions(path: Path, predictions: Mapping[str, str]) -> None:
    """Write {question id: answer text} as the official scripts read it (gzipped when the name ends in .gz)."""
    _write_json(path, dict(predictions))


def write_na_probs(path: Path, na_probs: Mapping[str, float]) -> None:
    _write_json(path, dict(na_probs))


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    data = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise InvalidInputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _parse_article(raw: Any, where: str) -> Article:
    raw = _require_object(raw, where)
    title = raw.get("title", "")
    if not isinstance(title, str):
        raise InvalidInputError(f"{where}.title must be a string, got {_kind(title)}")
    paragraphs = _require_list(raw, "paragraphs", where)
    return Article(
        title=title,
        paragraphs=tuple(_parse_paragraph(item, f"{where}.paragraphs[{i}]") for i, item in enumerate(paragraphs)),
    )


def _parse_paragraph(raw: Any, where: str) -> Paragraph:
    raw = _require_object(raw, where)
    context = _require_str(raw, "context", where)
    qas = _require_list(raw, "qas", where)
    return Paragraph(
        context=context, questions=tuple(_parse_question(item, f"{where}.qas[{i}]") for i, item in enumerate(qas))
    )


def _parse_question(raw: Any, where: str) -> Question:
    raw = _require_object(raw, where)
    qid = _require_str(raw, "id", where)
    question = _require_str(raw, "question", where)
    answers = tuple(
        _parse_answer(item, f"{where}.answers[{i}]") for i, item in enumerate(_require_list(raw, "answers", where))
    )
    is_impossible = raw.get("is_impossible", False)
    if not isinstance(is_impossible, bool):
        raise InvalidInputError(f"{where}.is_impossible must be true or false, got {_kind(is_impossible)}")
    return Question(id=qid, question=question, answers=answers, is_impossible=is_impossible)


def _parse_answer(raw: Any, where: str) -> Answer:
    raw = _require_object(raw, where)
    text = _require_str(raw, "text", where)
    start = raw.get("answer_start")
    if isinstance(start, bool) or not isinstance(start, int):
        raise InvalidInputError(f"{where}.answer_start must be an integer, got {_kind(start)}")
    return Answer(text=text, answer_start=start)


def _article_to_raw(article: Article) -> dict[str, Any]:
    return {
        "title": article.title,
        "paragraphs": [
            {
                "context": paragraph.context,
                "qas": [
                    {
                        "id": question.id,
                        "question": question.question,
                        "answers": [{"text": a.text, "answer_start": a.answer_start} for a in question.answers],
                        "is_impossible": question.is_impossible,
                    }
                    for question in paragraph.questions
                ],
            }
            for paragraph in article.paragraphs
        ],
    }


def _require_object(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{where} must be an object, got {_kind(raw)}")
    return raw


def _require_list(raw: dict[str, Any], key: str, where: str) -> list[Any]:
    if key not in raw:
        raise InvalidInputError(f"{where} has no '{key}' list")
    value = raw[key]
    if not isinstance(value, list):
        raise InvalidInputError(f"{where}.{key} must be a list, got {_kind(value)}")
    return value


def _require_str(raw: dict[str, Any], key: str, where: str) -> str:
    if key not in raw:
        raise InvalidInputError(f"{where} has no '{key}'")
    value = raw[key]
    if not isinstance(value, str):
        raise InvalidInputError(f"{where}.{key} must be a string, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)
