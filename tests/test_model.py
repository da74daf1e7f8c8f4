"""The denoiser: shapes, errors, the shared encoder, null conditioning, memory format, compile."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from evdm.config import ConfigError, Context, DataConfig, ModelConfig, RunConfig
from evdm.denoiser import to_layout as to_channels_last
from evdm.diffusion import linear_blend
from evdm.models import ConditioningEncoder, build_model, count_parameters
from evdm.models.blocks import short_attention, ChannelNorm, GroupNorm, channel_norm, group_norm

TINY = dict(base_channels=8, channel_mults=(1, 2), res_blocks=1, temporal_attn_levels=(1,), attn_head_channels=4)


def tiny_cfg(size=16, T=8, K=2, color_mode="rgb", **model) -> RunConfig:
    return RunConfig(data=DataConfig(size=size, T=T, context=Context(K, K), color_mode=color_mode),
                     model=ModelConfig(**{**TINY, **model}))


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised layers (output conv, FiLM, null, attention out) random weights,
    so that every input path visibly reaches the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(cfg: RunConfig, B: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    C, T, K, S = cfg.channels, cfg.data.T, cfg.context.start, cfg.data.size
    clip = torch.rand((B, C, T, S, S), generator=g) * 2 - 1
    x_t = torch.randn((B, C, T - 2 * K, S, S), generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    start, end = clip[:, :, :K], clip[:, :, T - K:]
    return x_t, t, start, end, linear_blend(start, end, T - 2 * K), torch.zeros(B, dtype=torch.bool)


@pytest.mark.parametrize("color_mode", ["rgb", "gray"])
@pytest.mark.parametrize("T,K", [(8, 2), (5, 2), (7, 1), (9, 3)])
def test_output_shape(color_mode, T, K):
    cfg = tiny_cfg(T=T, K=K, color_mode=color_mode)
    model = build_model(cfg)
    assert model.middle_frames == T - 2 * K and model.channels == cfg.channels
    x_t, *rest = inputs(cfg)
    out = model(x_t, *rest)
    assert out.shape == x_t.shape and out.dtype == torch.float32


def test_three_levels_with_attention_everywhere():
    cfg = tiny_cfg(size=16, channel_mults=(1, 2, 2), res_blocks=2, temporal_attn_levels=(0, 1, 2))
    x_t, *rest = inputs(cfg, B=1)
    assert randomize(build_model(cfg))(x_t, *rest).shape == x_t.shape


@pytest.mark.parametrize("T,K", [(4, 2), (3, 2), (6, 3)])
def test_no_middle_is_a_config_error_naming_both_numbers(T, K):
    with pytest.raises(ConfigError, match=rf"T={T}, context=\[{K}, {K}\]"):
        tiny_cfg(T=T, K=K)


def test_bad_sizes_are_rejected_clearly():
    with pytest.raises(ConfigError, match=r"data.size=18.*4"):
        tiny_cfg(size=18, channel_mults=(1, 2, 4))
    model = build_model(tiny_cfg(size=16, channel_mults=(1, 2, 4)))
    x_t, t, start, end, blend, drop = inputs(tiny_cfg(size=18))
    with pytest.raises(ValueError, match=r"18x18 must be divisible by 4"):
        model(x_t, t, start, end, blend, drop)
    x_t, t, start, end, blend, drop = inputs(tiny_cfg(size=16))
    with pytest.raises(ValueError, match=r"M=T-2K=4"):
        model(x_t[:, :, :3], t, start, end, blend[:, :, :3], drop)
    with pytest.raises(ValueError, match=r"end_context.*K=2"):
        model(x_t, t, start, end[:, :, :1], blend, drop)
    with pytest.raises(ConfigError, match="out of range"):
        tiny_cfg(channel_mults=(1, 2), temporal_attn_levels=(2,))


def test_endpoint_encoder_is_shared():
    model = randomize(build_model(tiny_cfg()))
    encoders = [m for m in model.modules() if isinstance(m, ConditioningEncoder)]
    assert len(encoders) == 1
    _, _, start, end, _, drop = inputs(tiny_cfg())
    # One parameter set: swapping the endpoints swaps their features exactly.
    fs, fe = model.encoder(start, end, drop)
    gs, ge = model.encoder(end, start, drop)
    assert len(fs) == 2 and fs[1].shape == (2, 16, 2, 8, 8)
    for a, b in zip(fs, ge):
        assert torch.allclose(a, b, atol=1e-6)
    for a, b in zip(fe, gs):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("direct_input", ["none", "both"])
def test_both_endpoints_and_cond_drop_reach_the_output_per_sample(direct_input):
    cfg = tiny_cfg(direct_input=direct_input)
    model = randomize(build_model(cfg)).eval()
    x_t, t, start, end, _, _ = inputs(cfg)
    keep, drop = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    call = lambda s, e, d: model(x_t, t, s, e, linear_blend(s, e, x_t.shape[2]), d)  # noqa: E731
    base = call(start, end, keep)
    assert not torch.allclose(base, call(-start, end, keep))
    assert not torch.allclose(base, call(start, -end, keep))
    # Null conditioning ignores the endpoints entirely ...
    null = call(start, end, drop)
    assert torch.allclose(null, call(-start, -end, drop), atol=1e-6)
    assert not torch.allclose(base, null)
    # ... and acts per sample.
    mixed = call(start, end, torch.tensor([True, False]))
    assert torch.allclose(mixed[0], null[0], atol=1e-5) and torch.allclose(mixed[1], base[1], atol=1e-5)


def test_fresh_model_predicts_zero_and_all_parameters_get_gradients():
    cfg = tiny_cfg()
    model = build_model(cfg)
    x_t, *rest = inputs(cfg)
    assert model(x_t, *rest).abs().max() == 0  # zero-initialised output conv
    model = randomize(model)
    model(x_t, *rest).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing  # (null parameters get gradient through torch.where even when unused: zeros)


def test_fusion_is_position_aware():
    model = build_model(tiny_cfg(T=9, K=2))  # M = 5
    w = model.fusion[0].w.flatten()
    assert torch.allclose(w, torch.tensor([1, 2, 3, 4, 5]) / 6)


def test_channels_last_matches_contiguous():
    cfg = tiny_cfg()
    model = randomize(build_model(cfg)).eval()
    args = inputs(cfg)
    ref = model(*args)
    cl = [a.to(memory_format=torch.channels_last_3d) if a.ndim == 5 else a for a in args]
    out = to_channels_last(model)(*cl)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(out, ref, atol=1e-5)


def sdpa_layout(x: torch.Tensor) -> torch.Tensor:
    """[B, L, P, heads, d] -> SDPA's [B * P, heads, L, d]."""
    B, L, P, h, d = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B * P, h, L, d)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_short_attention_equals_sdpa_with_gradients(dtype, atol):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, L, 5, 2, 8, generator=g).to(dtype).requires_grad_() for L in (4, 8, 8))
    ours = short_attention(q, k, v)  # [B, Lq, P, heads, d]
    ref = F.scaled_dot_product_attention(sdpa_layout(q), sdpa_layout(k), sdpa_layout(v))
    assert ours.dtype == dtype
    assert torch.allclose(sdpa_layout(ours).float(), ref.float(), atol=atol)
    grad = torch.randn(ref.shape, generator=g).to(dtype)
    mine = torch.autograd.grad(sdpa_layout(ours), (q, k, v), grad)
    theirs = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(mine, theirs):
        assert torch.allclose(a.float(), b.float(), atol=4 * atol)


def test_batch_64_at_64_px_needs_no_chunking():
    """64 px, batch 64: level 1 attention runs 64 * 32 * 32 = 65,536 sequences, one more than CUDA's SDPA
    takes in one call; the broadcast attention runs them in one call and matches the per-sample results."""
    cfg = tiny_cfg(size=64, base_channels=4, channel_mults=(1, 2), temporal_attn_levels=(1,), attn_head_channels=4)
    model = randomize(to_channels_last(build_model(cfg))).eval()
    args = [a.to(memory_format=torch.channels_last_3d) if a.ndim == 5 else a for a in inputs(cfg, B=64)]
    with torch.no_grad():
        out = model(*args)
        first = model(*[a[:2] for a in args])
    assert out.shape[0] == 64 and torch.isfinite(out).all()
    assert torch.allclose(out[:2], first, atol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_norms_equal_torch_and_their_compiled_forms_keep_dtype_and_layout(layout):
    x = torch.randn(2, 16, 3, 5, 5).to(memory_format=layout) * 3 + 1
    gn, ln = GroupNorm(4, 16, eps=1e-6), ChannelNorm(16)
    with torch.no_grad():
        for p in (*gn.parameters(), *ln.parameters()):
            p.normal_()
    ref_gn = F.group_norm(x, 4, gn.weight, gn.bias, 1e-6)
    ref_ln = F.layer_norm(x.movedim(1, -1), (16,), ln.weight, ln.bias, ln.eps).movedim(-1, 1)
    # The compiled forms (the functions) and the eager ones (the modules) compute the same norms.
    assert torch.allclose(gn(x), ref_gn, atol=1e-5) and torch.allclose(ln(x), ref_ln, atol=1e-5)
    compiled_forms = (lambda v: group_norm(v, 4, gn.weight, gn.bias, 1e-6), lambda v: channel_norm(v, ln.weight, ln.bias, ln.eps))
    for form, ref in zip(compiled_forms, (ref_gn, ref_ln)):
        assert torch.allclose(form(x), ref, atol=1e-5)
        out = form(x.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=layout)
        assert torch.allclose(out.float(), ref, atol=0.05)


def test_reference_parameter_count():
    model = build_model(RunConfig())  # 64 px, T 8, K 2, base 96, mults 1 2 4, res 2, attention at 1 2
    assert count_parameters(model) == 50_963_331
    # direct_input "both": 15 more stem input channels (the blend and 4 context frames, RGB) x 96 x 3 x 3
    old = build_model(RunConfig(model=ModelConfig(direct_input="none")))
    assert count_parameters(old) == 50_950_371 == 50_963_331 - 15 * 96 * 9


def test_dropout_config_is_used():
    cfg = tiny_cfg()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.5))
    model = randomize(build_model(cfg)).train()
    args = inputs(cfg)
    assert not torch.equal(model(*args), model(*args))


@pytest.mark.slow
def test_a_compiled_denoiser_samples_any_batch_with_inductor(tmp_path, monkeypatch):
    """Denoiser.compile on the real backend (Inductor's C++ on a CPU): the blocks' compiled forms (the
    norms' fp32-statistics functions, the broadcast attention) give the eager denoiser's samples, the
    attention is not pattern-matched back into SDPA, batch 4 after batch 5 compiles no new graph (the
    batch is symbolic, so nothing is padded), and the caches go to the folder asked for. On a CPU the
    convolution backend's choice guards the batch to a range (the encoder's 2B frames >= 8 here), and
    a batch outside it compiles again."""
    from torch._dynamo.utils import counters
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from evdm.config import SampleConfig
    from evdm.denoiser import CACHE_ENV, Denoiser

    monkeypatch.setenv(CACHE_ENV, default_cache_dir())  # what importing torch._dynamo leaves a user with
    cfg = dataclasses.replace(tiny_cfg(T=6, K=2, channel_mults=(1, 2), temporal_attn_levels=(0, 1)),
                              sample=SampleConfig(steps=2))
    cpu = torch.device("cpu")
    eager = Denoiser(cfg, cpu, precision="fp32", net=randomize(build_model(cfg))).eval()
    compiled = Denoiser(cfg, cpu, precision="fp32", net=copy.deepcopy(eager.net)).eval()
    assert compiled.compile("on", cache_dir=tmp_path / "cache")
    counters.clear()
    graphs = []
    for batch in (5, 4):
        _, _, start, end, _, _ = inputs(cfg, B=batch)
        out = compiled.generate(start, end, generator=torch.Generator().manual_seed(batch))
        assert out.shape[0] == batch
        assert torch.allclose(out, eager.generate(start, end, generator=torch.Generator().manual_seed(batch)), atol=1e-4)
        graphs.append(counters["stats"]["unique_graphs"])
    assert counters["inductor"]["fuse_attention"] == 0
    assert 0 < graphs[0] == graphs[1]
    assert any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("direct_input,extra", [("none", 0), ("blend", 3), ("context", 12), ("both", 15)])
def test_direct_input_hands_the_endpoints_to_the_stem(direct_input, extra):
    """The stem sees x_t plus `extra` channels: the blend the residual uses, and/or every context frame
    beside every middle frame; none of them in guidance's null branch. Only the stem grows."""
    from evdm.diffusion import linear_blend

    cfg = tiny_cfg(direct_input=direct_input)
    model = build_model(cfg)
    grown = count_parameters(model) - count_parameters(build_model(tiny_cfg(direct_input="none")))
    assert grown == extra * TINY["base_channels"] * 3 * 3
    x_t, t, start, end, blend, keep = inputs(cfg)
    stem_in = model._stem_input(x_t, start, end, blend, keep)
    assert stem_in.shape == (2, 3 + extra, 4, 16, 16) and torch.equal(stem_in[:, :3], x_t)
    if direct_input in ("blend", "both"):
        assert torch.allclose(stem_in[:, 3:6], linear_blend(start, end, 4), atol=1e-6)
    if direct_input in ("context", "both"):
        frames = torch.cat([start, end], dim=2)  # [B, 3, 4, H, W] -> channels c * 4 + k
        for m in range(4):
            assert torch.equal(stem_in[:, -12:, m].reshape(2, 3, 4, 16, 16), frames)
    assert not model._stem_input(x_t, start, end, blend, ~keep)[:, 3:].any()
    assert model(x_t, t, start, end, blend, keep).shape == x_t.shape


