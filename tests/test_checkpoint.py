"""Checkpoint loading: every supported format gives the same canonical weights; bad ones fail clearly."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from realtime_qa.builder.checkpoint import Checkpoint, checkpoint_sha256, expected_shapes, load_checkpoint
from realtime_qa.builder.onnx_graph import save_graph
from realtime_qa.qacore.errors import CheckpointError
from safetensors.numpy import save_file

TF_TINY = Path(__file__).parent / "data" / "tf_bert_tiny"


@pytest.fixture(scope="module")
def shipped(shipped_model_dir: Path) -> Checkpoint:
    return load_checkpoint(shipped_model_dir)


def hf_dir(
    tmp_path: Path, source: Path, weights: dict[str, np.ndarray] | None = None, **config_changes: object
) -> Path:
    """An HF directory with `source`'s config (changed as asked), tokenizer and, if given, one weights file."""
    out = tmp_path / "model"
    out.mkdir()
    config = json.loads((source / "config.json").read_text())
    config.update(config_changes)
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "vocab.txt"):
        shutil.copyfile(source / name, out / name)
    if weights is not None:
        save_file(weights, str(out / "model.safetensors"))
    return out


def assert_same_weights(got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float = 0.0) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == np.float32, name
        np.testing.assert_allclose(got[name], value, rtol=0, atol=atol, err_msg=name)


# ---------------------------------------------------------------------------------------------- formats


def test_sharded_fp16_checkpoint_loads_as_float32_with_every_tensor(
    shipped: Checkpoint, shipped_model_dir: Path
) -> None:
    assert shipped.model_id == "minilm-l6-squad"
    assert shipped.tokenizer_dir == shipped_model_dir
    assert shipped.config.num_hidden_layers == 6
    shapes = expected_shapes(shipped.config)
    assert {name: tuple(value.shape) for name, value in shipped.weights.items()} == shapes
    assert all(value.dtype == np.float32 for value in shipped.weights.values())
    assert len(shipped.source_sha256) == 64
    assert checkpoint_sha256(shipped_model_dir) == shipped.source_sha256


def test_single_safetensors_file_and_hf_names_without_prefix(
    shipped: Checkpoint, shipped_model_dir: Path, tmp_path: Path
) -> None:
    # Encoder-only exports name tensors without the "bert." prefix; a pooler is dropped.
    raw = {name.removeprefix("bert."): value for name, value in shipped.weights.items()}
    raw["pooler.dense.weight"] = np.zeros((384, 384), np.float32)
    raw["embeddings.position_ids"] = np.arange(512, dtype=np.int64)[None]
    model = hf_dir(tmp_path, shipped_model_dir, raw)
    loaded = load_checkpoint(model)
    assert_same_weights(loaded.weights, shipped.weights)
    assert loaded.source_sha256 != shipped.source_sha256


def test_bfloat16_safetensors_are_widened(shipped: Checkpoint, shipped_model_dir: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    model = hf_dir(tmp_path, shipped_model_dir)
    save_torch(
        {name: torch.from_numpy(value).to(torch.bfloat16) for name, value in shipped.weights.items()},
        str(model / "model.safetensors"),
    )
    loaded = load_checkpoint(model)
    want = {name: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for name, v in shipped.weights.items()}
    assert_same_weights(loaded.weights, want)


def test_pytorch_bin(shipped: Checkpoint, shipped_model_dir: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    model = hf_dir(tmp_path, shipped_model_dir)
    torch.save({name: torch.from_numpy(value) for name, value in shipped.weights.items()}, model / "pytorch_model.bin")
    assert_same_weights(load_checkpoint(model).weights, shipped.weights)
    assert_same_weights(load_checkpoint(model / "pytorch_model.bin").weights, shipped.weights)


def test_pytorch_bin_without_torch_names_the_dependency(
    shipped_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = hf_dir(tmp_path, shipped_model_dir)
    (model / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(CheckpointError, match=r"needs torch"):
        load_checkpoint(model)


def test_real_tensorflow_checkpoint() -> None:
    """A checkpoint written by TensorFlow itself (see tests/data/tf_bert_tiny/make_checkpoint.py)."""
    expected = np.load(TF_TINY / "expected.npz")
    for source in (TF_TINY, TF_TINY / "model.ckpt-3", TF_TINY / "model.ckpt-3.index"):
        checkpoint = load_checkpoint(source)
        assert checkpoint.config.num_hidden_layers == 3
        assert checkpoint.tokenizer_dir == TF_TINY
        weights = checkpoint.weights
        assert set(weights) == set(expected_shapes(checkpoint.config))
        tf = {name.replace("__", "/"): expected[name] for name in expected.files}
        np.testing.assert_array_equal(
            weights["bert.embeddings.word_embeddings.weight"], tf["bert/embeddings/word_embeddings"]
        )
        np.testing.assert_array_equal(
            weights["bert.embeddings.LayerNorm.weight"], tf["bert/embeddings/LayerNorm/gamma"]
        )
        np.testing.assert_array_equal(
            weights["bert.encoder.layer.2.attention.self.query.weight"],
            tf["bert/encoder/layer_2/attention/self/query/kernel"].T,
        )
        np.testing.assert_array_equal(
            weights["bert.encoder.layer.0.intermediate.dense.weight"],
            tf["bert/encoder/layer_0/intermediate/dense/kernel"].T,
        )
        np.testing.assert_array_equal(weights["qa_outputs.weight"], tf["cls/squad/output_weights"])
        np.testing.assert_array_equal(weights["qa_outputs.bias"], tf["cls/squad/output_bias"])


# A TensorFlow bundle writer following the format spec (LevelDB table + BundleEntryProto), so a real
# model's weights can go through the reader too, with many table blocks and shared key prefixes.
DT_FLOAT, DT_INT64, DT_HALF = 1, 9, 19
TF_DTYPE_OF = {np.dtype(np.float32): DT_FLOAT, np.dtype(np.int64): DT_INT64, np.dtype(np.float16): DT_HALF}


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return varint(number << 3 | 2) + varint(len(value)) + value
    return varint(number << 3) + varint(value)


def bundle_entry(dtype: int, shape: tuple[int, ...], offset: int, size: int) -> bytes:
    dims = b"".join(field(2, field(1, dim)) for dim in shape)
    return field(1, dtype) + field(2, dims) + field(3, 0) + field(4, offset) + field(5, size) + b"\x35" + b"\0" * 4


def table_block(entries: list[tuple[bytes, bytes]], restart_interval: int) -> bytes:
    out, restarts, previous = bytearray(), [], b""
    for index, (key, value) in enumerate(entries):
        shared = 0
        if index % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        previous = key
    return bytes(out) + b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))


def write_table(path: Path, items: dict[bytes, bytes], block_entries: int = 7) -> None:
    data, index = bytearray(), []
    keys = sorted(items)

    def add_block(block: bytes) -> bytes:
        handle = varint(len(data)) + varint(len(block))
        data.extend(block + b"\0" + b"\0" * 4)  # no compression; crc not checked by the reader
        return handle

    for start in range(0, len(keys), block_entries):
        chunk = [(key, items[key]) for key in keys[start : start + block_entries]]
        index.append((chunk[-1][0], add_block(table_block(chunk, restart_interval=3))))
    metaindex = add_block(table_block([], 1))
    index_handle = add_block(table_block(index, restart_interval=1))
    footer = (metaindex + index_handle).ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    path.write_bytes(bytes(data) + footer)


def write_tf_checkpoint(prefix: Path, variables: dict[str, np.ndarray]) -> None:
    data, items = bytearray(), {}
    for name, value in variables.items():
        raw = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()
        items[name.encode()] = bundle_entry(TF_DTYPE_OF[value.dtype], value.shape, len(data), len(raw))
        data += raw
    items[b""] = field(1, 1) + field(2, 0) + field(3, field(1, 1))  # header: one shard, little endian
    write_table(prefix.parent / (prefix.name + ".index"), items)
    (prefix.parent / f"{prefix.name}.data-00000-of-00001").write_bytes(bytes(data))


def tf_variables(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Canonical weights under NVIDIA's TF names (kernels [in, out]), with optimizer state beside them."""
    out: dict[str, np.ndarray] = {"global_step": np.array(1000, np.int64)}
    for name, value in weights.items():
        if name == "qa_outputs.weight":
            out["cls/squad/output_weights"] = value
            continue
        if name == "qa_outputs.bias":
            out["cls/squad/output_bias"] = value
            continue
        parts = name.split(".")
        if parts[1] == "encoder":
            parts = ["bert", "encoder", f"layer_{parts[3]}", *parts[4:]]
        leaf = parts[-1]
        if parts[-2] == "LayerNorm":
            tf_name = "/".join([*parts[:-1], "gamma" if leaf == "weight" else "beta"])
        elif parts[-2].endswith("embeddings"):
            tf_name = "/".join(parts[:-1])
        else:
            tf_name = "/".join([*parts[:-1], "kernel" if leaf == "weight" else "bias"])
            value = value.T if leaf == "weight" else value
        out[tf_name] = value
        out[tf_name + "/adam_m"] = np.zeros_like(value)
    out["bert/pooler/dense/kernel"] = np.zeros((4, 4), np.float32)
    return out


def test_tensorflow_checkpoint_of_real_weights(shipped: Checkpoint, shipped_model_dir: Path, tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "tf"
    ckpt_dir.mkdir()
    variables = tf_variables(shipped.weights)
    variables["bert/embeddings/token_type_embeddings"] = variables["bert/embeddings/token_type_embeddings"].astype(
        np.float16
    )
    write_tf_checkpoint(ckpt_dir / "model.ckpt-1000", variables)
    write_tf_checkpoint(ckpt_dir / "model.ckpt-5", {"global_step": np.array(5, np.int64)})  # an older step
    config = json.loads((shipped_model_dir / "config.json").read_text())
    (ckpt_dir / "bert_config.json").write_text(json.dumps(config))
    shutil.copyfile(shipped_model_dir / "vocab.txt", ckpt_dir / "vocab.txt")

    loaded = load_checkpoint(ckpt_dir)  # the directory means its latest step
    want = dict(shipped.weights)
    name = "bert.embeddings.token_type_embeddings.weight"
    want[name] = want[name].astype(np.float16).astype(np.float32)
    assert_same_weights(loaded.weights, want)
    assert loaded.tokenizer_dir == ckpt_dir


def test_nvidia_layout_with_config_dir_and_vocab_file(
    shipped: Checkpoint, shipped_model_dir: Path, tmp_path: Path
) -> None:
    # NVIDIA's builder takes -m <ckpt prefix> -c <dir with bert_config.json> -v <vocab.txt> from different places.
    weights_dir, config_dir, vocab_dir = (tmp_path / name for name in ("weights", "config", "vocab"))
    for directory in (weights_dir, config_dir, vocab_dir):
        directory.mkdir()
    write_tf_checkpoint(weights_dir / "model.ckpt-8144", tf_variables(shipped.weights))
    shutil.copyfile(shipped_model_dir / "config.json", config_dir / "bert_config.json")
    shutil.copyfile(shipped_model_dir / "vocab.txt", vocab_dir / "vocab.txt")
    loaded = load_checkpoint(weights_dir / "model.ckpt-8144", config_dir=config_dir, vocab_file=vocab_dir / "vocab.txt")
    assert_same_weights(loaded.weights, shipped.weights)
    assert loaded.tokenizer_dir == vocab_dir


def test_our_onnx_graph_reads_back_as_the_same_checkpoint(shipped: Checkpoint, tmp_path: Path) -> None:
    path = save_graph(shipped, tmp_path / "exported" / "bert.onnx")
    for name in ("tokenizer.json", "vocab.txt"):
        shutil.copyfile(shipped.tokenizer_dir / name, path.parent / name)
    loaded = load_checkpoint(path)
    assert loaded.config == shipped.config
    assert_same_weights(loaded.weights, shipped.weights)


# ---------------------------------------------------------------------------------------------- bad checkpoints


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nowhere")


def test_no_config(shipped: Checkpoint, shipped_model_dir: Path, tmp_path: Path) -> None:
    model = hf_dir(tmp_path, shipped_model_dir, shipped.weights)
    (model / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no model config in .*config\.json or bert_config\.json"):
        load_checkpoint(model)


def test_config_without_required_fields(shipped: Checkpoint, shipped_model_dir: Path, tmp_path: Path) -> None:
    model = hf_dir(tmp_path, shipped_model_dir, shipped.weights)
    (model / "config.json").write_text(json.dumps({"vocab_size": 30522}))
    with pytest.raises(CheckpointError, match="lacks hidden_size, num_hidden_layers, num_attention_heads"):
        load_checkpoint(model)


def test_missing_tensor(shipped: Checkpoint, shipped_model_dir: Path, tmp_path: Path) -> None:
    weights = dict(shipped.weights)
    del weights["bert.encoder.layer.3.output.dense.bias"]
    with pytest.raises(CheckpointError, match=r"missing tensor bert\.encoder\.layer\.3\.output\.dense\.bias"):
        load_checkpoint(hf_dir(tmp_path, shipped_model_dir, weights))


def test_shape_mismatch(shipped: Checkpoint, shipped_model_dir: Path, tmp_path: Path) -> None:
    model = hf_dir(tmp_path, shipped_model_dir, shipped.weights, intermediate_size=1024)
    with pytest.raises(
        CheckpointError, match=r"shape mismatch for bert\.encoder\.layer\.0\.intermediate\.dense\.weight"
    ):
        load_checkpoint(model)


def test_more_layers_than_the_config_says(shipped: Checkpoint, shipped_model_dir: Path, tmp_path: Path) -> None:
    model = hf_dir(tmp_path, shipped_model_dir, shipped.weights, num_hidden_layers=4)
    with pytest.raises(CheckpointError, match=r"tensor bert\.encoder\.layer\.4\..* that its config does not explain"):
        load_checkpoint(model)


def test_missing_shard(shipped_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "sharded"
    shutil.copytree(shipped_model_dir, model)
    (model / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing shard model-00003-of-00004\.safetensors"):
        load_checkpoint(model)


def test_no_tokenizer(shipped: Checkpoint, shipped_model_dir: Path, tmp_path: Path) -> None:
    model = hf_dir(tmp_path, shipped_model_dir, shipped.weights)
    (model / "tokenizer.json").unlink()
    (model / "vocab.txt").unlink()
    with pytest.raises(CheckpointError, match=r"no tokenizer in .*tokenizer\.json or vocab\.txt"):
        load_checkpoint(model)


def test_base_encoder_needs_a_head_seed(shipped: Checkpoint, shipped_model_dir: Path, tmp_path: Path) -> None:
    encoder = {name: value for name, value in shipped.weights.items() if not name.startswith("qa_outputs")}
    model = hf_dir(tmp_path, shipped_model_dir, encoder)
    with pytest.raises(CheckpointError, match=r"no QA head .*--init-qa-head-seed"):
        load_checkpoint(model)
    first, again, other = (load_checkpoint(model, init_qa_head_seed=seed) for seed in (0, 0, 1))
    np.testing.assert_array_equal(first.weights["qa_outputs.weight"], again.weights["qa_outputs.weight"])
    assert not np.array_equal(first.weights["qa_outputs.weight"], other.weights["qa_outputs.weight"])
    assert first.weights["qa_outputs.weight"].shape == (2, 384)


def test_non_finite_weights(shipped: Checkpoint, shipped_model_dir: Path, tmp_path: Path) -> None:
    weights = dict(shipped.weights)
    weights["qa_outputs.bias"] = np.array([0.0, np.nan], np.float32)
    with pytest.raises(CheckpointError, match=r"qa_outputs\.bias holds NaN"):
        load_checkpoint(hf_dir(tmp_path, shipped_model_dir, weights))


def test_corrupt_safetensors(shipped_model_dir: Path, tmp_path: Path) -> None:
    model = hf_dir(tmp_path, shipped_model_dir)
    (model / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json at all")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a safetensors file"):
        load_checkpoint(model)


def test_tensorflow_checkpoint_missing_its_data_shard(tmp_path: Path) -> None:
    ckpt = tmp_path / "tf"
    shutil.copytree(TF_TINY, ckpt)
    (ckpt / "model.ckpt-3.data-00000-of-00001").unlink()
    with pytest.raises(CheckpointError, match=r"missing TensorFlow data shard model\.ckpt-3\.data-00000-of-00001"):
        load_checkpoint(ckpt)


def test_tensorflow_index_that_is_not_a_table(tmp_path: Path) -> None:
    ckpt = tmp_path / "tf"
    shutil.copytree(TF_TINY, ckpt)
    (ckpt / "model.ckpt-3.index").write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointError, match=r"model\.ckpt-3\.index is not a TensorFlow checkpoint index"):
        load_checkpoint(ckpt)


def test_onnx_model_from_elsewhere(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    with pytest.raises(CheckpointError, match="not written by this builder"):
        load_checkpoint(tmp_path / "other.onnx")
