"""Writing a model in Hugging Face layout: config.json, sharded safetensors with index, tokenizer, card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from realtime_qa.qacore.config import ModelConfig
from realtime_qa.qacore.tokenization import TOKENIZER_JSON, VOCAB_TXT

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 15 * 1024 * 1024  # under the 16 MiB a device call can bring back per file


def save_hf_model(
    out_dir: Path,
    config: ModelConfig,
    weights: dict[str, np.ndarray],
    tokenizer_dir: Path,
    dtype: str = "float16",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    model_card: str | None = None,
) -> list[Path]:
    """Write `weights` (HF BertForQuestionAnswering names) as shards of at most `shard_bytes` each.

    A tensor larger than one shard gets a shard of its own. Returns the shard paths.
    """
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    groups: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    for name in sorted(weights):
        tensor = np.ascontiguousarray(weights[name], dtype=np.dtype(dtype))
        if sizes[-1] and sizes[-1] + tensor.nbytes > shard_bytes:
            groups.append({})
            sizes.append(0)
        groups[-1][name] = tensor
        sizes[-1] += tensor.nbytes
    shards = []
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        shard = out_dir / f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(shard), metadata={"format": "pt"})
        shards.append(shard)
        weight_map.update(dict.fromkeys(group, shard.name))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    hf_config = {
        "architectures": ["BertForQuestionAnswering"],
        "model_type": "bert",
        "torch_dtype": dtype,
        "pad_token_id": 0,
        **config.to_dict(),
    }
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    for name in (TOKENIZER_JSON, VOCAB_TXT):
        if (tokenizer_dir / name).is_file() and tokenizer_dir.resolve() != out_dir.resolve():
            shutil.copyfile(tokenizer_dir / name, out_dir / name)
    if model_card is not None:
        (out_dir / "README.md").write_text(model_card, encoding="utf-8")
    return shards
