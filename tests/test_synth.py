"""The synthetic BAIR-like dataset: determinism, options, layout, and motion that is worth learning."""

import subprocess

import numpy as np

from evdm.ffmpeg import ffmpeg_exe
from preprocess.synth import SPLIT_DIRS, generate, main, render_video


def _decode(path, size):
    out = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24",
                          "pipe:"], capture_output=True, check=True).stdout
    return np.frombuffer(out, np.uint8).reshape(-1, size, size, 3)


def test_render_is_a_pure_function_of_its_arguments():
    a = render_video((1, 0, 3), frames=6, size=20)
    assert a.shape == (6, 20, 20, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_video((1, 0, 3), frames=6, size=20))
    assert not np.array_equal(a, render_video((1, 0, 4), frames=6, size=20))


def test_motion_is_smooth_and_present():
    # Smooth: consecutive frames differ less than the endpoints do. Present: the middle is not a
    # blend of the endpoints, so interpolation has something to learn.
    for i in range(6):
        v = render_video((0, 0, i), frames=12, size=32).astype(np.float64)
        step = np.abs(np.diff(v, axis=0)).mean()
        span = np.abs(v[-1] - v[0]).mean()
        blend = np.abs(v[6] - (v[0] + (v[-1] - v[0]) * 6 / 11)).mean()
        assert 0 < step < span
        assert blend > 0.1


def test_same_seed_same_files_and_layout(tmp_path):
    kwargs = dict(videos=4, val_fraction=0.25, frames=5, size=16, seed=7, workers=2)
    a = generate(tmp_path / "a", **kwargs)
    b = generate(tmp_path / "b", **kwargs)
    assert [len(a["train"]), len(a["val"])] == [3, 1]
    for split, folder in SPLIT_DIRS.items():
        names = sorted(p.name for p in (tmp_path / "a" / folder).glob("*.mp4"))
        assert names == sorted(p.name for p in a[split])
        for pa, pb in zip(a[split], b[split]):
            assert pa.read_bytes() == pb.read_bytes()
    other = generate(tmp_path / "c", **{**kwargs, "seed": 8})
    assert other["train"][0].read_bytes() != a["train"][0].read_bytes()


def test_cli_honours_options_and_encodes_faithfully(tmp_path):
    assert main([str(tmp_path), "--videos", "2", "--val-fraction", "0.5", "--frames", "7", "--size", "24",
                 "--seed", "3", "--workers", "1"]) == 0
    train = sorted((tmp_path / "videos_train").glob("*.mp4"))
    val = sorted((tmp_path / "videos_val").glob("*.mp4"))
    assert len(train) == 1 and len(val) == 1
    decoded = _decode(train[0], 24)
    assert decoded.shape == (7, 24, 24, 3)
    # crf 10 yuv444p: decoded frames stay close to the rendered ones.
    rendered = render_video((3, 0, 0), frames=7, size=24)
    assert np.abs(decoded.astype(int) - rendered).mean() < 3.0


def test_cli_rejects_bad_options(tmp_path, capsys):
    assert main([str(tmp_path), "--videos", "0"]) == 2
    assert "videos" in capsys.readouterr().err


def _blend_psnr(v: np.ndarray, K: int = 2) -> float:
    """PSNR (dB, capped at 60) of the linear blend of the last start and first end frame against the
    middle of an 8-frame clip: how well interpolation alone does."""
    w = (np.arange(1, 9 - 2 * K) / (9 - 2 * K))[:, None, None, None]
    mse = np.mean((v[K:8 - K] - ((1 - w) * v[K - 1] + w * v[8 - K])) ** 2) / 255.0**2
    return float(min(60.0, 10 * np.log10(1 / max(mse, 1e-12))))


def test_orbit_motion_bends_away_from_the_blend():
    """orbit: deterministic, unlike glide, and its middles sit much further from the endpoints' linear
    blend (turns and occlusions) over the same seeds; glide is unchanged by the option."""
    seeds = [(0, 0, i) for i in range(12)]
    # 8-frame windows of 30-frame videos, as preprocess.shard cuts them.
    glide = [v[s:s + 8] for seed in seeds for v in [render_video(seed, size=32).astype(np.float64)] for s in (0, 8, 16)]
    orbit = [v[s:s + 8] for seed in seeds for v in [render_video(seed, size=32, motion="orbit").astype(np.float64)]
             for s in (0, 8, 16)]
    assert np.array_equal(orbit[0], render_video(seeds[0], size=32, motion="orbit")[:8])
    assert np.array_equal(glide[0], render_video(seeds[0], size=32, motion="glide")[:8])
    assert not np.array_equal(glide[0], orbit[0])
    assert all(np.abs(np.diff(v, axis=0)).mean() > 0 for v in orbit)  # every orbit clip moves
    assert np.mean([_blend_psnr(v) for v in orbit]) < np.mean([_blend_psnr(v) for v in glide]) - 6  # 37.3 vs 28.3 dB here


def test_cli_motion_option(tmp_path, capsys):
    assert main([str(tmp_path), "--videos", "1", "--val-fraction", "0", "--frames", "4", "--size", "16",
                 "--motion", "orbit", "--workers", "1"]) == 0
    decoded = _decode(next((tmp_path / "videos_train").glob("*.mp4")), 16)
    rendered = render_video((0, 0, 0), frames=4, size=16, motion="orbit")
    assert np.abs(decoded.astype(int) - rendered).mean() < 3.0
