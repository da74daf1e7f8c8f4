"""Diffusion math: schedule closed forms, the loss, the samplers (stub networks in a Denoiser, CPU, fast)."""

import dataclasses

import pytest
import torch

from evdm.config import Context, DataConfig, DiffusionConfig, RunConfig, SampleConfig
from evdm.denoiser import Denoiser
from evdm.diffusion import (Draws, apply_dynamic_threshold, diffusion_loss, draw_training_noise, guided_output,
                            linear_blend, make_schedule, q_sample, sampling_timesteps, split_output, training_target)

B, C, K, M, H, W = 2, 3, 2, 3, 8, 8
CONTEXT = Context(K, K)


def eps_from_x0(s, x_t, t, x0):
    return split_output(s, x_t, t, x0, "x0")[1]


def denoiser(net, s, prediction="eps", residual="none", **diffusion) -> Denoiser:
    """`net` as the network of an fp32 CPU denoiser over the schedule `s` (linear or cosine)."""
    kind = "linear" if torch.equal(s.betas, make_schedule("linear", s.timesteps).betas) else "cosine"
    cfg = RunConfig(data=DataConfig(T=2 * K + M, context=CONTEXT, size=H),
                    diffusion=DiffusionConfig(schedule=kind, timesteps=s.timesteps, prediction=prediction,
                                              residual=residual, **diffusion),
                    sample=SampleConfig(steps=1))  # generate() below passes its own settings
    return Denoiser(cfg, torch.device("cpu"), precision="fp32", net=net)


def generate(net, s, clip, *, prediction="eps", residual="none", seed=0, **sample):
    """Denoiser.generate between clip's context frames with SampleConfig(**sample)."""
    settings = SampleConfig(**{"guidance_scale": 1.0, "steps": 10, **sample})
    return denoiser(net, s, prediction, residual).generate(clip[:, :, :K], clip[:, :, -K:], settings,
                                                          generator=torch.Generator().manual_seed(seed))


def loss_of(net, s, clip, seed=0, **kwargs):
    """The loss through the Denoiser, as training computes it (its own draws from a seeded generator)."""
    return denoiser(net, s, **kwargs).loss(clip, torch.Generator().manual_seed(seed))


def make_clip(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((B, C, 2 * K + M, H, W), generator=g) * 2 - 1


class Oracle(torch.nn.Module):
    """Predicts exactly the eps / v / x0 consistent with a known clean middle `x0`."""

    def __init__(self, s, x0, prediction="eps"):
        super().__init__()
        self.s, self.x0, self.prediction, self.middle_frames = s, x0, prediction, x0.shape[2]
        self.batch_sizes = []

    def forward(self, x_t, t, start_context, end_context, blend, cond_drop):
        self.batch_sizes.append(x_t.shape[0])
        self.seen = dict(x_t=x_t, start=start_context, end=end_context, blend=blend)
        x0 = self.x0.repeat(x_t.shape[0] // self.x0.shape[0], 1, 1, 1, 1)
        # A dropped condition gets a worse guess (zeros), so guidance has something to amplify.
        x0 = torch.where(cond_drop.reshape(-1, 1, 1, 1, 1), torch.zeros_like(x0), x0)
        return training_target(self.s, x0, t, eps_from_x0(self.s, x_t, t, x0), self.prediction)


class Linear(torch.nn.Module):
    """A small deterministic model whose output depends on every input, including cond_drop."""

    def __init__(self):
        super().__init__()
        self.middle_frames = M

    def forward(self, x_t, t, start_context, end_context, blend, cond_drop):
        ctx = (start_context.mean(2, keepdim=True) - end_context.mean(2, keepdim=True))
        keep = (~cond_drop).float().reshape(-1, 1, 1, 1, 1)
        return 0.5 * x_t + keep * ctx + 1e-4 * t.float().reshape(-1, 1, 1, 1, 1)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_shapes_and_monotone(kind):
    s = make_schedule(kind, 1000)
    assert s.timesteps == 1000
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance"):
        assert getattr(s, name).dtype == torch.float32 and getattr(s, name).shape == (1000,)
    ab = s.alphas_cumprod
    assert (ab[1:] < ab[:-1]).all() and ab[0] < 1 and ab[-1] > 0
    assert s.alphas_cumprod_prev[0] == 1 and torch.equal(s.alphas_cumprod_prev[1:], ab[:-1])
    assert ab[-1] < 0.01  # ends essentially at pure noise
    assert torch.allclose(s.sqrt_alphas_cumprod**2 + s.sqrt_one_minus_alphas_cumprod**2, torch.ones(1000))


def test_linear_betas_closed_form_and_bad_args():
    s = make_schedule("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert make_schedule("linear", 100).betas[-1].item() == pytest.approx(0.2)  # scaled by 1000/T
    with pytest.raises(ValueError, match="quadratic"):
        make_schedule("quadratic", 10)


def test_q_sample_statistics():
    s = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((4, 1, 1, 50, 50), 0.5)
    t = torch.tensor([0, 100, 500, 999])
    noise = torch.randn(x0.shape, generator=g)
    x_t = q_sample(s, x0, t, noise)
    ab = s.alphas_cumprod[t].double()
    mean, std = x_t.flatten(1).mean(1).double(), x_t.flatten(1).std(1).double()
    assert torch.allclose(mean, 0.5 * ab.sqrt(), atol=0.05)
    assert torch.allclose(std, (1 - ab).sqrt(), rtol=0.05, atol=0.005)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_converter_round_trips(prediction, kind):
    s = make_schedule(kind, 1000)
    x0 = make_clip()[:, :, :M]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([3, 700])
    x_t = q_sample(s, x0, t, noise)
    out = training_target(s, x0, t, noise, prediction)
    x0_hat, eps_hat = split_output(s, x_t, t, out, prediction)  # pred_x0(q_sample(x0, eps)) == x0
    assert torch.allclose(x0_hat, x0, atol=2e-4) and torch.allclose(eps_hat, noise, atol=1e-4)
    assert torch.allclose(eps_from_x0(s, x_t, t, x0), noise, atol=1e-4)


def test_draw_training_noise_shapes_determinism_and_drop_rate():
    shape = (4000, 2, 1, 2, 2)
    kwargs = dict(timesteps=50, cfg_drop_prob=0.25, noise_offset=0.0, device="cpu")
    draws = draw_training_noise(shape, generator=torch.Generator().manual_seed(0), **kwargs)
    assert isinstance(draws, Draws)
    t, noise, drop = draws
    t2, noise2, drop2 = draw_training_noise(shape, generator=torch.Generator().manual_seed(0), **kwargs)
    assert t.dtype == torch.int64 and t.shape == (4000,) and 0 <= t.min() and t.max() < 50
    assert noise.shape == shape and drop.dtype == torch.bool
    assert torch.equal(t, t2) and torch.equal(noise, noise2) and torch.equal(drop, drop2)
    assert 0.22 < drop.float().mean() < 0.28
    _, none, _ = draw_training_noise(shape, generator=torch.Generator().manual_seed(0), **{**kwargs, "cfg_drop_prob": 0.0})
    assert torch.equal(none, noise)
    _, offset, _ = draw_training_noise(shape, generator=torch.Generator().manual_seed(0), **{**kwargs, "noise_offset": 1.0})
    shift = (offset - noise).flatten(2)  # a per-(sample, channel) constant, N(0, 1) across samples
    assert torch.allclose(shift, shift[:, :, :1].expand_as(shift), atol=1e-5)
    assert 0.9 < shift[:, :, 0].std() < 1.1


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_loss_is_zero_for_a_perfect_model_and_sees_only_the_middle(prediction):
    s = make_schedule("linear", 1000)
    clip = make_clip()
    model = Oracle(s, clip[:, :, K:-K], prediction)
    loss, stats = loss_of(model, s, clip, prediction=prediction, cfg_drop_prob=0.0)
    assert loss.item() < 1e-8 and set(stats) == {"mse", "temporal"}
    assert not stats["mse"].requires_grad
    seen = model.seen
    assert seen["x_t"].shape == (B, C, M, H, W)
    assert torch.equal(seen["start"], clip[:, :, :K]) and torch.equal(seen["end"], clip[:, :, -K:])
    assert torch.equal(seen["blend"], linear_blend(clip[:, :, :K], clip[:, :, -K:], M))  # the one blend


def test_temporal_loss_penalises_motion_across_the_boundary():
    """A constant offset on every predicted middle frame keeps the inner differences right but
    breaks both boundary differences: only the temporal term (with the endpoints attached) sees it."""
    s = make_schedule("linear", 1000)
    clip = make_clip()
    middle = clip[:, :, K:-K]
    t = torch.zeros(B, dtype=torch.long)  # alpha_bar ~ 1: the temporal weight is ~1
    noise = torch.randn(middle.shape, generator=torch.Generator().manual_seed(3))
    x_t = q_sample(s, middle, t, noise)
    x0_shifted = middle + 0.1
    model = lambda x, tt, d: eps_from_x0(s, x, tt, x0_shifted)  # noqa: E731
    drop = torch.zeros(B, dtype=torch.bool)
    _, stats = diffusion_loss(model, s, clip[:, :, :K], middle, clip[:, :, -K:], Draws(t, noise, drop),
                              base=None, prediction="eps", temporal_loss_weight=1.0)
    expected = s.alphas_cumprod[0] * 2 * 0.1**2 / (M + 1)  # 2 of M+1 differences are off by 0.1
    assert stats["temporal"].item() == pytest.approx(expected.item(), rel=1e-2)
    assert torch.allclose(eps_from_x0(s, x_t, t, x0_shifted), model(x_t, t, None))


def test_loss_rejects_clip_without_middle():
    s = make_schedule("linear", 10)
    with pytest.raises(ValueError, match="T=4"):
        loss_of(Linear(), s, torch.zeros(1, 1, 4, 4, 4))


def test_sampling_timesteps():
    ts = sampling_timesteps(1000, 40)
    assert len(ts) == 40 and ts[0] == 999 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))
    assert sampling_timesteps(10, 10) == list(range(9, -1, -1))
    with pytest.raises(ValueError, match="steps"):
        sampling_timesteps(10, 11)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_oracle_sampler_recovers_the_middle_and_keeps_context_exact(sampler, eta, prediction):
    s = make_schedule("cosine", 1000)
    clip = make_clip(5)
    model = Oracle(s, clip[:, :, K:-K], prediction)
    out = generate(model, s, clip, sampler=sampler, eta=eta, prediction=prediction)
    assert out.shape == clip.shape
    assert torch.equal(out[:, :, :K], clip[:, :, :K]) and torch.equal(out[:, :, -K:], clip[:, :, -K:])
    assert torch.allclose(out[:, :, K:-K], clip[:, :, K:-K], atol=1e-4)


def test_ddim_eta0_is_deterministic_given_the_seed():
    s = make_schedule("linear", 100)
    clip = make_clip()
    run = lambda seed: generate(Linear(), s, clip, steps=8, guidance_scale=1.8, seed=seed)  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_guidance_scale_one_is_the_conditional_branch_alone():
    s = make_schedule("linear", 100)
    clip = make_clip()
    model = Oracle(s, clip[:, :, K:-K])
    x_t, t = torch.randn(B, C, M, H, W), torch.full((B,), 50)
    conditions = (clip[:, :, :K], clip[:, :, -K:], linear_blend(clip[:, :, :K], clip[:, :, -K:], M))
    output = lambda x, tt, c, d: model(x, tt, *c, d)  # noqa: E731
    cond = output(x_t, t, conditions, torch.zeros(B, dtype=torch.bool))
    null = output(x_t, t, conditions, torch.ones(B, dtype=torch.bool))
    model.batch_sizes.clear()
    assert torch.equal(guided_output(output, x_t, t, conditions, 1.0), cond)
    assert model.batch_sizes == [B]  # no null branch
    guided = guided_output(output, x_t, t, conditions, 1.8)
    assert model.batch_sizes == [B, 2 * B]  # both branches in one batched forward
    assert torch.allclose(guided, null + 1.8 * (cond - null), atol=1e-5)


def test_guidance_in_a_limited_interval_leaves_the_noisier_steps_unguided():
    s = make_schedule("linear", 100)
    clip = make_clip()
    model = Oracle(s, clip[:, :, K:-K])
    # 4 steps: t = 99, 66, 33, 0. guidance_max_t 0.5 guides t <= 49.5: the two noisier steps run the
    # conditional branch alone (batch B), the two others both branches (2B), nothing computed to be discarded.
    every = generate(model, s, clip, steps=4, guidance_scale=1.8, seed=0)
    assert model.batch_sizes == [2 * B] * 4
    model.batch_sizes.clear()
    assert torch.equal(every, generate(model, s, clip, steps=4, guidance_scale=1.8, seed=0, guidance_max_t=1.0))
    model.batch_sizes.clear()
    half = generate(model, s, clip, steps=4, guidance_scale=1.8, seed=0, guidance_max_t=0.5)
    assert model.batch_sizes == [B, B, 2 * B, 2 * B]
    assert not torch.equal(every, half)


def test_dynamic_threshold():
    x0 = torch.linspace(-3, 3, 2 * 100).reshape(2, 100)
    x0[1] = x0[1] / 10  # within [-1, 1]: left as is
    y = apply_dynamic_threshold(x0, 0.9)
    assert y[0].abs().max() <= 1 + 1e-6 and torch.equal(y[1], x0[1])
    s = make_schedule("linear", 100)
    clip = make_clip()
    out = generate(Oracle(s, 3 * clip[:, :, K:-K]), s, clip, steps=5, guidance_scale=2.0, dynamic_threshold=0.995)
    assert torch.equal(out[:, :, :K], clip[:, :, :K]) and torch.equal(out[:, :, -K:], clip[:, :, -K:])
    assert out.abs().max() <= 1


def test_sampler_rejects_bad_arguments():
    from evdm.diffusion import sample

    s = make_schedule("linear", 10)
    with pytest.raises(ValueError, match="sampler"):
        sample(lambda x, t: x, s, torch.zeros(1, 1, 1, 2, 2), sampler="euler", steps=2)
    with pytest.raises(ValueError, match="steps"):
        sample(lambda x, t: x, s, torch.zeros(1, 1, 1, 2, 2), steps=11)


def test_residual_blend_round_trips_through_loss_and_sampler():
    """A model that knows middle - blend scores zero loss and samples the exact middle in "blend" mode."""
    from evdm.diffusion import linear_blend

    s = make_schedule("cosine", 100)
    clip = make_clip()
    start, middle, end = clip[:, :, :K], clip[:, :, K:-K], clip[:, :, -K:]
    residual = middle - linear_blend(start, end, M)
    for prediction in ("eps", "v", "x0"):
        knows_residual = Oracle(s, residual, prediction)
        loss, _ = loss_of(knows_residual, s, clip, prediction=prediction, residual="blend")
        assert loss.item() < 1e-8
        plain, _ = loss_of(knows_residual, s, clip, prediction=prediction)
        assert plain.item() > 1e-3  # the same model is wrong about the plain middle
        out = generate(knows_residual, s, clip, prediction=prediction, residual="blend")
        assert torch.allclose(out[:, :, K:-K], middle, atol=1e-4)
        assert torch.equal(out[:, :, :K], start) and torch.equal(out[:, :, -K:], end)


def test_residual_floor_keeps_the_blend_where_the_model_changes_it_by_little():
    """sample.residual_floor: each generated value more than `floor` gray levels away from the blend is the
    model's, bit for bit; every other value is the blend's, bit for bit; the context frames stay exact."""
    s = make_schedule("cosine", 100)
    clip = make_clip()
    start, end = clip[:, :, :K], clip[:, :, -K:]
    blend = linear_blend(start, end, M)
    levels = torch.randint(-6, 7, (B, C, M, H, W), generator=torch.Generator().manual_seed(1)).float()
    model = Oracle(s, levels * 2 / 255, "x0")  # a model whose change to the blend is whole gray levels
    free = generate(model, s, clip, prediction="x0", residual="blend")
    assert torch.allclose(free[:, :, K:-K], (blend + levels * 2 / 255).clamp(-1, 1), atol=1e-4)
    floored = generate(model, s, clip, prediction="x0", residual="blend", residual_floor=2.5)
    kept = levels.abs() > 2.5
    assert 0 < kept.float().mean() < 1
    assert torch.equal(floored[:, :, K:-K][kept], free[:, :, K:-K][kept])
    assert torch.equal(floored[:, :, K:-K][~kept], blend[~kept])
    assert torch.equal(floored[:, :, :K], start) and torch.equal(floored[:, :, -K:], end)
