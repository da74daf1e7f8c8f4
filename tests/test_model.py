"""The denoiser: shapes, errors, the shared encoder, null conditioning, memory format, compile."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from evdm.config import DataConfig, ModelConfig, RunConfig
from evdm.models import (
    SPACETIME_FORMS, ConditioningEncoder, VideoUNet3D, adapt_conv_weights, adapt_optimizer_state, build_model,
    count_parameters, to_channels_last,
)
from evdm.models.blocks import SDPA_MAX_BATCH, TemporalAttention

TINY = dict(base_channels=8, channel_mults=(1, 2), res_blocks=1, temporal_attn_levels=(1,), attn_head_channels=4)


def tiny_cfg(size=16, T=8, K=2, color_mode="rgb", **model) -> RunConfig:
    return RunConfig(data=DataConfig(size=size, T=T, endpoint_context=K, color_mode=color_mode),
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
    C, T, K, S = cfg.channels, cfg.data.T, cfg.data.endpoint_context, cfg.data.size
    clip = torch.rand((B, C, T, S, S), generator=g) * 2 - 1
    x_t = torch.randn((B, C, T - 2 * K, S, S), generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    return x_t, t, clip[:, :, :K], clip[:, :, T - K:], torch.zeros(B, dtype=torch.bool)


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
def test_no_middle_is_a_construction_error_naming_both_numbers(T, K):
    with pytest.raises(ValueError, match=rf"T={T}.*endpoint_context={K}"):
        VideoUNet3D(channels=3, T=T, K=K, base_channels=8, channel_mults=(1,), temporal_attn_levels=())


def test_bad_sizes_are_rejected_clearly():
    with pytest.raises(ValueError, match=r"data.size=18.*4"):
        build_model(tiny_cfg(size=18, channel_mults=(1, 2, 4)))
    model = build_model(tiny_cfg(size=16, channel_mults=(1, 2, 4)))
    x_t, t, start, end, drop = inputs(tiny_cfg(size=18))
    with pytest.raises(ValueError, match=r"18x18 must be divisible by 4"):
        model(x_t, t, start, end, drop)
    x_t, t, start, end, drop = inputs(tiny_cfg(size=16))
    with pytest.raises(ValueError, match=r"M=T-2K=4"):
        model(x_t[:, :, :3], t, start, end, drop)
    with pytest.raises(ValueError, match=r"end_context.*K=2"):
        model(x_t, t, start, end[:, :, :1], drop)
    with pytest.raises(ValueError, match="out of range"):
        VideoUNet3D(channels=3, T=8, K=2, channel_mults=(1, 2), temporal_attn_levels=(2,))


def test_endpoint_encoder_is_shared():
    model = randomize(build_model(tiny_cfg()))
    encoders = [m for m in model.modules() if isinstance(m, ConditioningEncoder)]
    assert len(encoders) == 1
    _, _, start, end, drop = inputs(tiny_cfg())
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
    x_t, t, start, end, _ = inputs(cfg)
    keep, drop = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    base = model(x_t, t, start, end, keep)
    assert not torch.allclose(base, model(x_t, t, -start, end, keep))
    assert not torch.allclose(base, model(x_t, t, start, -end, keep))
    # Null conditioning ignores the endpoints entirely ...
    null = model(x_t, t, start, end, drop)
    assert torch.allclose(null, model(x_t, t, -start, -end, drop), atol=1e-6)
    assert not torch.allclose(base, null)
    # ... and acts per sample.
    mixed = model(x_t, t, start, end, torch.tensor([True, False]))
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


@pytest.mark.parametrize("spacetime", SPACETIME_FORMS)
def test_channels_last_matches_contiguous(spacetime):
    cfg = tiny_cfg(spacetime=spacetime)
    model = randomize(build_model(cfg)).eval()
    args = inputs(cfg)
    ref = model(*args)
    cl = [a.to(memory_format=torch.channels_last_3d) if a.ndim == 5 else a for a in args]
    out = to_channels_last(model)(*cl)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(out, ref, atol=1e-5)


def test_spacetime_forms_share_weights_and_maths():
    """The per-frame Conv2d form and the Conv3d form: same parameter count, same initial numbers from
    one seed, and the same outputs once either form's weights are loaded into the other."""
    cfg2, cfg3 = tiny_cfg(spacetime="2d"), tiny_cfg(spacetime="3d")
    torch.manual_seed(3)
    m2 = build_model(cfg2)
    torch.manual_seed(3)
    m3 = randomize(build_model(cfg3), seed=1).eval()
    assert count_parameters(m2) == count_parameters(m3)
    assert [k for k in m2.state_dict()] == [k for k in m3.state_dict()]
    shapes = {k: (v.shape, m3.state_dict()[k].shape) for k, v in m2.state_dict().items()
              if v.shape != m3.state_dict()[k].shape}
    assert any(len(a) == 4 and len(b) == 5 for a, b in shapes.values())  # the convs really differ in rank
    m2.load_state_dict(adapt_conv_weights(m3.state_dict(), m2))
    m2.eval()
    args = inputs(cfg2)
    assert torch.allclose(m2(*args), m3(*args), atol=1e-5)
    back = build_model(cfg3)
    back.load_state_dict(adapt_conv_weights(m2.state_dict(), back))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), m3.state_dict().values()))


def test_adapt_optimizer_state_follows_the_weights():
    cfg2, cfg3 = tiny_cfg(spacetime="2d"), tiny_cfg(spacetime="3d")
    m3 = randomize(build_model(cfg3))
    opt3 = torch.optim.AdamW(m3.parameters())
    m3(*inputs(cfg3)).square().mean().backward()
    opt3.step()
    m2 = build_model(cfg2)
    m2.load_state_dict(adapt_conv_weights(m3.state_dict(), m2))
    opt2 = torch.optim.AdamW(m2.parameters())
    opt2.load_state_dict(adapt_optimizer_state(opt3.state_dict(), m2))
    m2(*inputs(cfg2)).square().mean().backward()
    opt2.step()  # fails on a shape mismatch if any state tensor kept the 3d shape
    for p, state in zip(m2.parameters(), opt2.state_dict()["state"].values()):
        assert state["exp_avg"].shape == p.shape


def test_attention_pieces_equal_one_call():
    """Forcing tiny SDPA pieces changes neither the output nor the gradients."""
    cfg = tiny_cfg(size=8, channel_mults=(1,), temporal_attn_levels=(0,))
    torch.manual_seed(0)
    whole = randomize(build_model(cfg))
    pieces = copy.deepcopy(whole)
    for module in pieces.modules():
        if isinstance(module, TemporalAttention):
            module.max_batch = 7  # 2 * 8 * 8 = 128 rows -> 19 pieces, the last one shorter
    args = inputs(cfg)
    out_whole, out_pieces = whole(*args), pieces(*args)
    assert torch.allclose(out_whole, out_pieces, atol=1e-6)
    out_whole.square().mean().backward()
    out_pieces.square().mean().backward()
    for (name, a), b in zip(whole.named_parameters(), pieces.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_no_sdpa_call_exceeds_the_cuda_batch_limit(monkeypatch):
    """64 px, batch 64: level 1 attention folds 64 * 32 * 32 = 65,536 rows, one over CUDA's limit."""
    sizes = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, *args, **kwargs):
        sizes.append(q.shape[0])
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    cfg = tiny_cfg(size=64, base_channels=4, channel_mults=(1, 2), temporal_attn_levels=(1,), attn_head_channels=4)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(*inputs(cfg, B=64))
    assert out.shape[0] == 64
    assert max(sizes) <= SDPA_MAX_BATCH == 65_535
    assert sum(sizes) % (64 * 32 * 32) == 0 and len(sizes) > sum(sizes) // (64 * 32 * 32)  # it was split


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
def test_tiny_model_compiles_fullgraph(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    cfg = tiny_cfg(T=5, K=2, channel_mults=(1, 2), temporal_attn_levels=(0,))
    model = randomize(build_model(cfg)).eval()
    args = inputs(cfg)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(*args), model(*args), atol=1e-4)


@pytest.mark.parametrize("direct_input,extra", [("none", 0), ("blend", 3), ("context", 12), ("both", 15)])
def test_direct_input_hands_the_endpoints_to_the_stem(direct_input, extra):
    """The stem sees x_t plus `extra` channels: the blend the residual uses, and/or every context frame
    beside every middle frame; none of them in guidance's null branch. Only the stem grows."""
    from evdm.diffusion.residual import linear_blend

    cfg = tiny_cfg(direct_input=direct_input)
    model = build_model(cfg)
    grown = count_parameters(model) - count_parameters(build_model(tiny_cfg(direct_input="none")))
    assert grown == extra * TINY["base_channels"] * 3 * 3
    x_t, t, start, end, keep = inputs(cfg)
    stem_in = model._stem_input(x_t, start, end, keep)
    assert stem_in.shape == (2, 3 + extra, 4, 16, 16) and torch.equal(stem_in[:, :3], x_t)
    if direct_input in ("blend", "both"):
        assert torch.allclose(stem_in[:, 3:6], linear_blend(start, end, 4), atol=1e-6)
    if direct_input in ("context", "both"):
        frames = torch.cat([start, end], dim=2)  # [B, 3, 4, H, W] -> channels c * 4 + k
        for m in range(4):
            assert torch.equal(stem_in[:, -12:, m].reshape(2, 3, 4, 16, 16), frames)
    assert not model._stem_input(x_t, start, end, ~keep)[:, 3:].any()
    assert model(x_t, t, start, end, keep).shape == x_t.shape


def test_a_checkpoint_stored_without_direct_input_loads_the_model_it_was(tmp_path):
    """Checkpoints written before model.direct_input existed hold no such key: they must rebuild the
    model they were (a 3-channel stem, STORED_DEFAULTS), whatever the dataclass default for new
    configs is, and give the same outputs."""
    from evdm.checkpoint import make_payload, save_checkpoint
    from evdm.config import STORED_DEFAULTS, from_dict
    from evdm.pipeline import load_model

    cfg = tiny_cfg(direct_input="none")
    old = randomize(build_model(cfg)).eval()
    payload = make_payload(step=1, cfg=cfg, model=old, ema=old)
    del payload["config"]["model"]["direct_input"]  # as written before the key existed
    save_checkpoint(tmp_path / "old.pt", payload)
    model, stored, _ = load_model(tmp_path / "old.pt", torch.device("cpu"))
    assert stored.model.direct_input == STORED_DEFAULTS["model", "direct_input"] == "none"
    assert model.stem.weight.shape[1] == 3
    args = inputs(cfg)
    assert torch.equal(model(*args), old(*args))
    # A config file without the key gets the dataclass default instead: what new runs should use.
    assert from_dict({"model": {}}).model.direct_input == ModelConfig().direct_input
