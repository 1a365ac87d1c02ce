"""The confidence of a returned answer: the one definition the decoder, the service, the chain and training use.

Where abstaining is allowed, the decoder's softmax (over the n-best spans and the null answer) does not match its
decision: the decision shifts the null logit by the threshold (abstain when null - best span > threshold), the
softmax does not. So the returned answer's probability is taken from the softmax with the null logit shifted by
-threshold, under which abstaining is exactly the null answer outranking the best span:

    p_null' = p_null e^-t / (p_null e^-t + 1 - p_null),   p_span' = p_span / (p_null e^-t + 1 - p_null)

That shifted probability is still not calibrated (the model's logits are sharper than its accuracy), so a model
may ship a Platt scaling fitted on held-out data (`training.calibration.fit_platt`, first half of the v2.0 dev
articles) in its config.json, carried into each engine's meta.json:

    "qa_confidence_calibration": {"method": "platt", "a": A, "b": B}
    calibrated = sigmoid(A * logit(clip(p', 1e-6, 1 - 1e-6)) + B)

A model without one returns the shifted probability itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CALIBRATION_KEY = "qa_confidence_calibration"  # in a model's config.json
PLATT = "platt"
CLIP = 1e-6  # probabilities are clipped to [CLIP, 1 - CLIP] before their logit (as the fit clips them)


@dataclass(frozen=True)
class ConfidenceCalibration:
    """Platt scaling of the returned confidence: calibrated = sigmoid(a * logit(confidence) + b)."""

    a: float
    b: float
    method: str = PLATT

    def __post_init__(self) -> None:
        if self.method != PLATT:
            raise ValueError(f"method must be {PLATT!r}, got {self.method!r}")
        for name in ("a", "b"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

    def apply(self, confidence: float) -> float:
        """The calibrated probability that an answer returned with `confidence` is right."""
        return _sigmoid(self.a * confidence_logit(confidence) + self.b)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "a": float(self.a), "b": float(self.b)}

    @classmethod
    def from_dict(cls, raw: object) -> ConfidenceCalibration:
        """From its JSON form (config.json or meta.json); ValueError names what is wrong."""
        if not isinstance(raw, Mapping) or set(raw) != {"method", "a", "b"}:
            raise ValueError(f'must be {{"method": "platt", "a": A, "b": B}}, got {raw!r}')
        return cls(a=raw["a"], b=raw["b"], method=raw["method"])


def confidence_logit(confidence: float) -> float:
    """log(p / (1 - p)) of `confidence` clipped to [1e-6, 1 - 1e-6]: the feature the Platt scaling reads."""
    clipped = min(max(confidence, CLIP), 1.0 - CLIP)
    return math.log(clipped / (1.0 - clipped))


def shifted_probability(span_probability: float, null_probability: float, abstains: bool, threshold: float) -> float:
    """The probability of what the decoder returns (the null answer if `abstains`, else the best span), in the
    softmax over the n-best spans and the null answer with the null logit shifted by -`threshold`.

    `span_probability` and `null_probability` are the unshifted softmax's (`Span.score`, `Prediction.
    null_probability`). Computed in logs, so any finite threshold is safe."""
    log_null = _log(null_probability) - threshold
    log_rest = _log(1.0 - null_probability)  # the n-best spans' share
    log_norm = max(log_null, log_rest) + math.log1p(math.exp(-abs(log_null - log_rest)))
    if abstains:
        return math.exp(log_null - log_norm)
    return min(1.0, math.exp(_log(span_probability) - log_norm))


def returned_confidence(
    span_probability: float,
    null_probability: float,
    abstains: bool,
    threshold: float,
    calibration: ConfidenceCalibration | None,
) -> float:
    """The confidence the decoder returns where abstaining is allowed: the shifted probability of its answer (or
    of its abstention), mapped through the model's calibration when it ships one."""
    shifted = shifted_probability(span_probability, null_probability, abstains, threshold)
    return calibration.apply(shifted) if calibration is not None else shifted


def _log(probability: float) -> float:
    return math.log(probability) if probability > 0.0 else -math.inf


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
