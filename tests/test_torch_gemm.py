"""The split-K GEMM path of the fused forward (`qacore.backends.torch_gemm`) against the unsplit one.

On CPU: the plain-torch split sums and the consumers that add them up (float32), and the Triton kernels
under Triton's interpreter (marker `slow`); on a GPU (marker `gpu`): the engine with split-K GEMMs
against the previous engine, inside CUDA graphs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from realtime_qa.qacore.backends import torch_gemm  # noqa: E402
from realtime_qa.qacore.backends.torch_cuda import TorchEngineConfig  # noqa: E402
from realtime_qa.qacore.backends.torch_fused import (  # noqa: E402
    FusedBertForQA,
    _torch_bias_activation,
    _torch_residual_layernorm,
)
from realtime_qa.qacore.backends.torch_gemm import GemmConfig  # noqa: E402
from realtime_qa.qacore.config import ModelConfig  # noqa: E402
from realtime_qa.qacore.features import EngineInputs  # noqa: E402
from test_torch_layer_kernels import needs_cuda, open_torch_engine, run_interpreted  # noqa: E402

TINY = ModelConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
# Every projection of TINY split (QKV and FFN-in through partials + the activation consumer).
TINY_TABLE = {
    (192, 64): ((1 << 30, GemmConfig(64, 64, 16, 2)),),
    (64, 64): ((1 << 30, GemmConfig(64, 32, 16, 4)),),
    (128, 64): ((1 << 30, GemmConfig(64, 64, 16, 1)),),
    (64, 128): ((1 << 30, GemmConfig(64, 32, 16, 8)),),
}


def test_split_sums_and_consumers_equal_the_unsplit_result() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(70, 96), torch.randn(48, 96)
    bias, residual = torch.randn(48), torch.randn(70, 48)
    gamma, beta = 1 + 0.1 * torch.randn(48), 0.1 * torch.randn(48)
    for split in (1, 2, 3, 6):
        partial = torch_gemm.torch_partials(x, w, split)
        assert partial.shape == (split, 70, 48)
        torch.testing.assert_close(partial.sum(0), x @ w.T, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(
            _torch_residual_layernorm(partial, bias, residual, gamma, beta, 1e-12),
            _torch_residual_layernorm(x @ w.T, bias, residual, gamma, beta, 1e-12),
            atol=1e-5,
            rtol=1e-5,
        )
        for activation in ("gelu", "none"):
            torch.testing.assert_close(
                _torch_bias_activation(partial, bias, activation, torch.float32),
                _torch_bias_activation(x @ w.T, bias, activation),
                atol=1e-5,
                rtol=1e-5,
            )


def test_config_for_picks_by_token_count_and_falls_back_to_cublas() -> None:
    small, large = GemmConfig(128, 32, 64, 8), GemmConfig(128, 64, 64, 2)
    table = {(1024, 4096): ((128, small), (384, None), (1024, large))}
    assert torch_gemm.config_for(128, 1024, 4096, table) == small
    assert torch_gemm.config_for(64, 1024, 4096, table) == small
    assert torch_gemm.config_for(256, 1024, 4096, table) is None
    assert torch_gemm.config_for(512, 1024, 4096, table) == large
    assert torch_gemm.config_for(2048, 1024, 4096, table) is None  # past the last entry
    assert torch_gemm.config_for(128, 1024, 1024, table) is None  # shape not listed
    assert not GemmConfig(128, 48, 64, 1).fits(1024, 4096)
    for (n, k), entries in torch_gemm.TABLE.items():  # the committed table only holds configs that tile
        assert all(config is None or config.fits(n, k) for _, config in entries)


@pytest.mark.parametrize("attention_kernel", [False, True], ids=["sdpa", "attention-kernel-path"])
def test_fused_module_with_split_k_computes_the_same_function_on_cpu(attention_kernel: bool) -> None:
    """float32 on CPU: split sums through the consumers equal the cuBLAS-shaped (unsplit) forward; so does
    the attention-kernel path's structure (attention from the int mask, the QA head in the last LayerNorm)."""
    from realtime_qa.qacore.backends.torch_network import BertForQA

    torch.manual_seed(1)
    network = BertForQA(TINY).eval()
    plain = FusedBertForQA.from_state_dict(TINY, network.state_dict(), use_triton=False).eval()
    split = FusedBertForQA.from_state_dict(
        TINY, network.state_dict(), use_triton=False, splitk_gemm=True, attention_kernel=attention_kernel
    ).eval()
    split.gemm_table = TINY_TABLE
    ids = torch.randint(0, 300, (3, 40), dtype=torch.int32)
    segments = (torch.arange(40) > 12).int().expand(3, 40).contiguous()
    mask = torch.ones(3, 40, dtype=torch.int32)
    mask[1, 25:] = 0
    with torch.inference_mode():
        want = plain(ids, segments, mask)
        got = split(ids, segments, mask)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_split_k_kernels_equal_the_torch_path_under_the_interpreter() -> None:
    """The GEMM (partials and the bias/activation epilogue) and both consumers, float32, M not a tile multiple."""
    out = run_interpreted(
        """
        import torch
        from realtime_qa.qacore.backends import torch_gemm, torch_kernels
        from realtime_qa.qacore.backends.torch_fused import _torch_bias_activation, _torch_residual_layernorm
        from realtime_qa.qacore.backends.torch_gemm import GemmConfig
        torch.manual_seed(0)
        x, w = torch.randn(70, 64), torch.randn(48, 64)
        bias, residual = torch.randn(48), torch.randn(70, 48)
        gamma, beta = 1 + 0.1 * torch.randn(48), 0.1 * torch.randn(48)
        worst = 0.0
        for split in (1, 2, 4):
            config = GemmConfig(32, 16, 16, split)
            got = torch_gemm.partials(x, w, config)
            worst = max(worst, float((got - torch_gemm.torch_partials(x, w, split)).abs().max()))
            ln = torch_kernels.residual_layernorm(got, bias, residual, gamma, beta, 1e-12)
            want = _torch_residual_layernorm(x @ w.T, bias, residual, gamma, beta, 1e-12)
            worst = max(worst, float((ln - want).abs().max()))
            act = torch_kernels.bias_activation(got, bias, "gelu", torch.float32)
            worst = max(worst, float((act - _torch_bias_activation(x @ w.T, bias, "gelu")).abs().max()))
        for activation in ("none", "gelu"):
            got = torch_gemm.linear_epilogue(x, w, bias, GemmConfig(32, 16, 16, 1), activation)
            worst = max(worst, float((got - _torch_bias_activation(x @ w.T, bias, activation)).abs().max()))
        print(worst)
        """
    )
    assert float(out.split()[-1]) < 1e-4


@pytest.mark.slow
def test_attention_kernel_and_qa_head_equal_the_torch_path_under_the_interpreter() -> None:
    """float32: the attention kernel against SDPA with BertForQA's additive mask (a sequence that is not a
    multiple of the tiles, a padded row, an all-padding row, key blocks smaller than the sequence), and the
    LayerNorm kernel with the QA head against LayerNorm then the linear layer."""
    out = run_interpreted(
        """
        import torch
        from realtime_qa.qacore.backends import torch_kernels
        from realtime_qa.qacore.backends.torch_fused import _torch_attention, _torch_residual_layernorm
        torch.manual_seed(0)
        worst, scale = 0.0, 0.0
        for batch, seq, heads, head_dim, tiles in ((3, 70, 2, 32, None), (2, 40, 3, 16, (16, 16, 4, 2))):
            if tiles is not None:
                torch_kernels.attention_tiles = lambda seq, head_dim, t=tiles: torch_kernels.AttentionTiles(*t)
            qkv = torch.randn(batch * seq, 3 * heads * head_dim)
            mask = torch.ones(batch, seq, dtype=torch.int32)
            mask[1, seq // 2:] = 0
            if batch > 2:
                mask[2, :] = 0
            got = torch_kernels.attention(qkv, mask, heads)
            want = _torch_attention(qkv, mask, heads)
            assert got.shape == want.shape == (batch * seq, heads * head_dim)
            worst, scale = max(worst, float((got - want).abs().max())), max(scale, float(want.abs().max()))
        partials, residual = torch.randn(2, 70, 48), torch.randn(70, 48)
        bias, gamma, beta = torch.randn(48), 1 + 0.1 * torch.randn(48), 0.1 * torch.randn(48)
        head = (torch.randn(2, 48), torch.randn(2))
        got = torch_kernels.residual_layernorm(partials, bias, residual, gamma, beta, 1e-12, head=head)
        want = _torch_residual_layernorm(partials, bias, residual, gamma, beta, 1e-12, head=head)
        assert got.shape == want.shape == (70, 2) and got.dtype == torch.float32
        worst = max(worst, float((got - want).abs().max()))
        print(worst, scale)
        """
    )
    worst, scale = map(float, out.split()[-2:])
    assert scale > 0.5 and worst < 1e-4


# -- GPU ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_engine_dir(shipped_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from realtime_qa.builder.build import BuildConfig, build_engine

    out = tmp_path_factory.mktemp("torch16-splitk") / "engine"
    return build_engine(BuildConfig(checkpoint=shipped_model_dir, output=out, backend="torch", fp16=True,
                                    batch_sizes=(1, 8)))  # fmt: skip


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("forced", [False, True], ids=["committed-table", "every-projection-split"])
def test_gpu_split_k_graphs_match_the_previous_engine(
    fp16_engine_dir: Path, monkeypatch: pytest.MonkeyPatch, forced: bool
) -> None:
    """Random full windows at batch 1 and 8: logits of the split-K engine equal the previous engine's."""
    if forced:  # every projection of the shipped model (H 384, I 1536) through our kernels, at any M
        monkeypatch.setattr(
            torch_gemm,
            "TABLE",
            {
                (1152, 384): ((1 << 30, GemmConfig(128, 64, 64, 2)),),
                (384, 384): ((1 << 30, GemmConfig(64, 32, 64, 3)),),
                (1536, 384): ((1 << 30, GemmConfig(128, 64, 64, 1)),),
                (384, 1536): ((1 << 30, GemmConfig(128, 32, 128, 4, prefetch=True)),),
            },
        )
    rng = np.random.default_rng(0)
    with (
        open_torch_engine(fp16_engine_dir, TorchEngineConfig(splitk_gemm=True, attention_kernel=False)) as split,
        open_torch_engine(fp16_engine_dir, TorchEngineConfig(splitk_gemm=False)) as previous,
    ):
        for batch in (1, 8):
            ids = rng.integers(1000, 30000, size=(batch, 128), dtype=np.int32)
            segments = np.zeros_like(ids)
            segments[:, 40:] = 1
            inputs = EngineInputs(ids, segments, np.ones_like(ids))
            got, want = split.infer(inputs), previous.infer(inputs)
            np.testing.assert_allclose(got.start_logits, want.start_logits, atol=0.05)
            np.testing.assert_allclose(got.end_logits, want.end_logits, atol=0.05)


@pytest.mark.gpu
@needs_cuda
def test_gpu_attention_kernel_graphs_match_the_engine_without_it(fp16_engine_dir: Path) -> None:
    """Batch 1 and 8 at sequence 128 and a shorter bucket, rows padded to different lengths: the default engine
    (attention kernel, QA head in the last LayerNorm) gives the logits of the split-K engine without them."""
    rng = np.random.default_rng(1)
    with (
        open_torch_engine(fp16_engine_dir, TorchEngineConfig()) as new,
        open_torch_engine(fp16_engine_dir, TorchEngineConfig(attention_kernel=False)) as previous,
    ):
        assert new.module.attention_kernel and not previous.module.attention_kernel
        for batch, seq in ((1, 128), (8, 128), (8, 100)):
            ids = rng.integers(1000, 30000, size=(batch, seq), dtype=np.int32)
            segments = np.zeros_like(ids)
            segments[:, 30:] = 1
            mask = np.ones_like(ids)
            for row in range(1, batch):  # row 0 full, the others 9, 18, ... tokens shorter
                mask[row, seq - 9 * row :] = 0
            inputs = EngineInputs(ids, segments, mask)
            got, want = new.infer(inputs), previous.infer(inputs)
            valid = mask.astype(bool)
            np.testing.assert_allclose(got.start_logits[valid], want.start_logits[valid], atol=0.05)
            np.testing.assert_allclose(got.end_logits[valid], want.end_logits[valid], atol=0.05)
