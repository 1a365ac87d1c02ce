"""Regenerate this directory's TensorFlow checkpoint with real TensorFlow (not needed to run the tests).

    python -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu
    /tmp/tfenv/bin/python tests/data/tf_bert_tiny/make_checkpoint.py

Writes a tiny BERT with the variable names of google-research/bert and NVIDIA's BERT samples (plus
Adam slots and global_step, as training checkpoints have), saved by tf.compat.v1.train.Saver in the
V2 bundle format, and `expected.npz` with every variable's value as TensorFlow holds it.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

HERE = Path(__file__).resolve().parent
CONFIG: dict[str, Any] = {
    "vocab_size": 40,
    "hidden_size": 8,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "max_position_embeddings": 32,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "initializer_range": 0.02,
}


def variable_shapes() -> dict[str, list[int]]:
    h, i = CONFIG["hidden_size"], CONFIG["intermediate_size"]
    shapes = {
        "bert/embeddings/word_embeddings": [CONFIG["vocab_size"], h],
        "bert/embeddings/token_type_embeddings": [CONFIG["type_vocab_size"], h],
        "bert/embeddings/position_embeddings": [CONFIG["max_position_embeddings"], h],
        "bert/embeddings/LayerNorm/beta": [h],
        "bert/embeddings/LayerNorm/gamma": [h],
        "bert/pooler/dense/kernel": [h, h],
        "bert/pooler/dense/bias": [h],
        "cls/squad/output_weights": [2, h],
        "cls/squad/output_bias": [2],
    }
    for n in range(CONFIG["num_hidden_layers"]):
        layer = f"bert/encoder/layer_{n}"
        for name, (rows, cols) in {
            "attention/self/query": (h, h),
            "attention/self/key": (h, h),
            "attention/self/value": (h, h),
            "attention/output/dense": (h, h),
            "intermediate/dense": (h, i),
            "output/dense": (i, h),
        }.items():
            shapes[f"{layer}/{name}/kernel"] = [rows, cols]
            shapes[f"{layer}/{name}/bias"] = [cols]
        for norm in ("attention/output/LayerNorm", "output/LayerNorm"):
            shapes[f"{layer}/{norm}/beta"] = [h]
            shapes[f"{layer}/{norm}/gamma"] = [h]
    return shapes


def main() -> None:
    tf.compat.v1.disable_eager_execution()
    rng = np.random.default_rng(7)
    values = {}
    graph = tf.Graph()
    with graph.as_default():
        variables = []
        for name, shape in variable_shapes().items():
            value = rng.normal(0.0, 0.5, shape).astype(np.float32)
            if name.endswith("gamma"):
                value += 1.0
            values[name] = value
            variables.append(tf.compat.v1.get_variable(name, initializer=value))
            for slot in ("adam_m", "adam_v"):
                slot_value = np.abs(rng.normal(0.0, 1e-3, shape)).astype(np.float32)
                variables.append(tf.compat.v1.get_variable(f"{name}/{slot}", initializer=slot_value))
        step = tf.compat.v1.train.get_or_create_global_step()
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run(step.assign(3))
            saver.save(session, str(HERE / "model.ckpt"), global_step=3, write_meta_graph=False)
    (HERE / "checkpoint").unlink(missing_ok=True)
    (HERE / "bert_config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(ord("a") + k) for k in range(26)]
    tokens += [f"##{chr(ord('a') + k)}" for k in range(CONFIG["vocab_size"] - len(tokens))]
    (HERE / "vocab.txt").write_text("\n".join(tokens) + "\n")
    arrays: dict[str, Any] = {name.replace("/", "__"): value for name, value in values.items()}
    np.savez(HERE / "expected.npz", **arrays)
    print("TensorFlow", tf.__version__, "wrote", sorted(p.name for p in HERE.iterdir()))


if __name__ == "__main__":
    main()
