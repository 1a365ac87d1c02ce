"""`qa-train soup`: the uniform average of the weights of several `qa-train abstain` runs (a "model soup").

Why: runs tuned from one start model for one short epoch stay in one basin of the loss, so the mean of their
weights is itself a good model, and usually better than each ingredient (Wortsman et al., 2022): it averages
away the noise of one seed's batch order and mixes recipes (plain cross-entropy keeps more abstentions,
self-distillation more answers) at no cost at inference: the soup is one network of the same size.

Every ingredient must be a finished run of the same start model (`start_model_sha256` in its metrics.json) with
the same network shapes. The mean is taken in float32 over the ingredients' saved float16 weights; the soup is
then scored exactly as a run is (`abstain.score_and_export`: float16-rounded, v1.1 dev with abstention off, the
threshold tuned on the first half of the v2.0 dev articles and reported on the second) and exported like one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from realtime_qa.builder.checkpoint import load_checkpoint
from realtime_qa.qacore.features import Featurizer
from realtime_qa.qacore.squad import read_dataset
from realtime_qa.qacore.tokenization import load_tokenizer
from realtime_qa.training.abstain import score_and_export
from realtime_qa.training.config import TrainConfig
from realtime_qa.training.data import build_eval_set
from realtime_qa.training.runs import DEV_FILE, DEV_V2_FILE, MODEL_DIR, RunPaths, _device

log = logging.getLogger(__name__)

MIN_INGREDIENTS = 2


def average_weights(ingredients: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The element-wise mean (float32) of weight dicts that have the same names and shapes."""
    if len(ingredients) < MIN_INGREDIENTS:
        raise ValueError(f"a soup needs at least {MIN_INGREDIENTS} ingredients, got {len(ingredients)}")
    names = set(ingredients[0])
    for index, weights in enumerate(ingredients[1:], start=1):
        if set(weights) != names:
            raise ValueError(f"ingredient {index} has other tensors than ingredient 0")
        for name in names:
            if weights[name].shape != ingredients[0][name].shape:
                raise ValueError(
                    f"ingredient {index}: {name} is {weights[name].shape}, not {ingredients[0][name].shape}"
                )
    return {
        name: np.asarray(np.mean([weights[name] for weights in ingredients], axis=0, dtype=np.float32))
        for name in sorted(names)
    }


def read_ingredient(run_dir: Path) -> dict[str, Any]:
    """A finished run's metrics.json; refused when the run did not finish or kept no model."""
    from realtime_qa.training.finetune import METRICS

    metrics = run_dir / METRICS
    if not metrics.is_file() or not (run_dir / MODEL_DIR).is_dir():
        raise FileNotFoundError(f"{run_dir} is not a finished run (no {METRICS} or {MODEL_DIR}/)")
    summary = json.loads(metrics.read_text(encoding="utf-8"))
    if "tuned" not in summary or "start_model_sha256" not in summary:
        raise ValueError(f"{run_dir} is not a finished `qa-train abstain` run")
    return summary


def run_soup(name: str, ingredient_dirs: list[Path], paths: RunPaths) -> dict[str, Any]:
    """Average the `model/` weights of `ingredient_dirs` (finished abstain runs of one start model), score and
    export the result as run `name` in `paths.run_dir`. `paths.base_dir` gives the tokenizer files."""
    begin = time.perf_counter()
    summaries = [read_ingredient(run_dir) for run_dir in ingredient_dirs]
    starts = {summary["start_model_sha256"] for summary in summaries}
    if len(starts) != 1:
        raise ValueError(f"the ingredients start from different models: {sorted(starts)}")
    checkpoints = [load_checkpoint(run_dir / MODEL_DIR) for run_dir in ingredient_dirs]
    weights = average_weights([checkpoint.weights for checkpoint in checkpoints])
    first = summaries[0]
    # The soup's own config: the first ingredient's, renamed (its training fields describe every ingredient but
    # the seed and the loss, which `soup_of` lists per ingredient).
    config = TrainConfig.from_dict({**first["config"], "name": name})
    featurizer = Featurizer(load_tokenizer(paths.base_dir), config.featurizer)
    dev_v1 = build_eval_set(read_dataset(paths.squad_dir / DEV_FILE), featurizer)
    dev_v2 = build_eval_set(read_dataset(paths.squad_dir / DEV_V2_FILE), featurizer)
    summary: dict[str, Any] = {
        "config": config.to_dict(),
        "soup_of": [
            {
                "run": ingredient["config"]["name"],
                "config": ingredient["config"],
                "model_sha256": checkpoint.source_sha256,
                "tuned": ingredient["tuned"],
                "train_seconds": ingredient.get("train_seconds"),
            }
            for ingredient, checkpoint in zip(summaries, checkpoints, strict=True)
        ],
        "start_model": first.get("start_model"),
        "start_model_sha256": first["start_model_sha256"],
        "start": None,
        "teacher": None,
        "device": first.get("device"),
        "torch": first.get("torch"),
        # A soup trains nothing itself: its training time is that of its ingredients, run side by side.
        "train_seconds": max(ingredient.get("train_seconds") or 0.0 for ingredient in summaries),
        "positive_windows": first.get("positive_windows"),
        "negative_windows": first.get("negative_windows"),
        "negative_examples": first.get("negative_examples"),
        "negatives": first.get("negatives"),
        "train_questions": first.get("train_questions"),
    }
    log.info("soup %s of %s", name, [str(run_dir) for run_dir in ingredient_dirs])
    return score_and_export(weights, checkpoints[0].config, paths, dev_v1, dev_v2, config, _device(), summary, begin)
