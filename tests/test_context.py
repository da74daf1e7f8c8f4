"""Asymmetric context (data.context = [1, 2]): MCVD's BAIR interpolation setup is 1 observed frame
before the middle and 2 after. Config, model, training, sampling and evaluation."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_tiny, make_train_shards
from evdm.config import ConfigError, Context, DataConfig, ModelConfig, RunConfig, from_dict
from evdm.models import build_model, count_parameters

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(base_channels=8, channel_mults=(1, 2), res_blocks=1, temporal_attn_levels=(1,), attn_head_channels=4)


def test_context_counts():
    assert RunConfig().context == (2, 2) and RunConfig().middle_frames == 4
    cfg = from_dict({"data": {"context": [1, 2]}})
    assert cfg.context == Context(1, 2) and cfg.middle_frames == 5
    with pytest.raises(ConfigError, match=r"data.T .*T=8, context=\[3, 5\]"):
        from_dict({"data": {"T": 8, "context": [3, 5]}})
    with pytest.raises(ConfigError, match=r"data.context\[1\] must be >= 1"):
        from_dict({"data": {"context": [2, -1]}})


def test_asymmetric_model_shapes_and_parameters():
    sym = build_model(RunConfig(data=DataConfig(size=16), model=ModelConfig(**TINY)))
    cfg = RunConfig(data=DataConfig(size=16, context=Context(1, 2)), model=ModelConfig(**TINY))
    model = build_model(cfg)
    assert model.context == (1, 2) and model.middle_frames == 5
    # one start frame fewer: only the fusion projections' and the start null conditioning's inputs shrink
    assert count_parameters(model) < count_parameters(sym)
    x_t = torch.randn(2, 3, 5, 16, 16)
    start, end = torch.rand(2, 3, 1, 16, 16), torch.rand(2, 3, 2, 16, 16)
    out = model(x_t, torch.tensor([3, 700]), start, end, x_t, torch.tensor([False, True]))
    assert out.shape == x_t.shape
    with pytest.raises(ValueError, match=r"start_context .*K=1"):
        model(x_t, torch.tensor([3, 700]), end, end, x_t, torch.tensor([False, True]))


def test_encoder_encodes_each_end_alone_when_counts_differ():
    """Unequal counts take one pass per end; its features equal encoding each end by itself."""
    cfg = RunConfig(data=DataConfig(size=16, context=Context(1, 2)), model=ModelConfig(**TINY))
    enc = build_model(cfg).encoder.eval()
    start, end = torch.rand(2, 3, 1, 16, 16), torch.rand(2, 3, 2, 16, 16)
    s_feats, e_feats = enc(start, end, torch.zeros(2, dtype=torch.bool))
    for got, want in zip(s_feats + e_feats, enc.encode(start) + enc.encode(end)):
        assert torch.equal(got, want)


def _png(path: Path, frame: np.ndarray) -> str:
    Image.fromarray(frame).save(path)
    return str(path)


@pytest.mark.slow
def test_one_plus_five_plus_two_trains_samples_and_evaluates_with_exact_context(tmp_path, capsys):
    """MCVD's setup end to end: train (train.py), sample from images and from shards (sample.py), evaluate."""
    from evdm.train import train

    shards = tmp_path / "shards"
    shards.mkdir()
    make_train_shards(shards)
    out = train(load_tiny(shards, tmp_path / "run", **{"data.context": "[1, 2]"}))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["config"]["data"]["context"] == [1, 2]

    assert (out / "previews" / "step_0000006.png").is_file()

    from evdm.data.tar import iter_clips
    key, truth = next(iter_clips(str(shards / "val-000000.tar")))
    images = [_png(tmp_path / f"f{i}.png", truth[i]) for i in (0, 6, 7)]
    sys.path.insert(0, str(ROOT))
    import sample as sample_py  # the entry point itself, in process (a subprocess per call costs a torch import)

    run = lambda *args: sample_py.main(["--ckpt", str(out / "last.pt"), "--device", "cpu", *args])  # noqa: E731
    assert run("--start_images", images[0], "--end_images", *images[1:], "--out_dir", str(tmp_path / "img"),
               "--steps", "3") == 0
    sample = np.load(tmp_path / "img" / "sample_000.npy")
    assert sample.shape == truth.shape
    assert np.array_equal(sample[:1], truth[:1]) and np.array_equal(sample[6:], truth[6:])
    assert run("--start_images", *images[1:], "--end_images", images[0], "--out_dir", str(tmp_path / "bad")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "observes 1 frame(s) at the start (data.context)" in err[0]

    assert run("--shards", str(shards / "val-*.tar"), "--num", "3", "--out_dir", str(tmp_path / "sh"), "--steps", "3") == 0
    for key, truth in list(iter_clips(str(shards / "val-000000.tar")))[:3]:
        sample = np.load(tmp_path / "sh" / f"{key}.npy")
        assert np.array_equal(sample[:1], truth[:1]) and np.array_equal(sample[6:], truth[6:])
        assert not np.array_equal(sample[1:6], truth[1:6])

    from evdm.evaluate import evaluate
    result = evaluate(out / "last.pt", str(shards / "val-*.tar"), num=4, batch_size=4, steps_list=[2],
                      device="cpu", progress=False)
    assert (result["context_start"], result["context_end"], result["M"]) == (1, 2, 5)
    assert all(len(r["psnr_per_position"]) == 5 for r in result["rows"])
