"""ffmpeg minterpolate as the peer (evdm.peer): frames at the middle instants, clips kept apart in one
process, whole videos; and evaluate's --peer minterpolate rows on tiny clips."""

import json

import numpy as np
import pytest
import torch

import demo_upsample
from evdm import evaluate as ev
from evdm import peer
from evdm.diffusion import linear_blend


def squares(n: int, T: int, size: int = 32, channels: int = 3, seed: int = 0) -> np.ndarray:
    """uint8 [n, T, size, size, C]: an 8 px square of one colour gliding 2 px a frame over a flat floor."""
    rng = np.random.default_rng(seed)
    clips = np.full((n, T, size, size, channels), 40, np.uint8)
    for b in range(n):
        y, x = rng.integers(0, size - 8 - 2 * T, size=2)
        color = rng.integers(100, 256, size=channels)
        for f in range(T):
            clips[b, f, y:y + 8, x + 2 * f:x + 2 * f + 8] = color
    return clips


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((x.astype(float) - y.astype(float)) ** 2)))


@pytest.mark.parametrize("context, T", [((1, 1), 5), ((2, 2), 6), ((2, 1), 6), ((1, 1), 3)])
@pytest.mark.parametrize("channels", [3, 1])
def test_blend_mode_puts_frames_where_the_linear_blend_does(context, T, channels):
    """Frame m at w = (m + 1) / (M + 1) between the last start and the first end frame: minterpolate's blend
    equals evaluate's linear blend row up to its rounding to 8 bits (and its weights in 1/1024ths)."""
    clips = squares(3, T, channels=channels)
    middles = peer.interpolate_clips(clips, context, peer.BLEND)
    M = T - sum(context)
    assert middles.shape == (3, M, 32, 32, channels)
    start, end = (torch.from_numpy(clips[:, a:b]).permute(0, 4, 1, 2, 3).float()
                  for a, b in ((0, context[0]), (T - context[1], T)))
    blend = linear_blend(start, end, M).permute(0, 2, 3, 4, 1).numpy()
    assert np.abs(middles - blend).max() <= 0.5 + 1e-3


def test_clips_in_one_process_are_kept_apart():
    """One minterpolate instance per clip: a clip's frames are the same alone or among others."""
    clips = squares(5, 6, seed=1)
    setting = peer.Setting(mb_size=4, me_mode="bidir", mc_mode="aobmc", vsbmc=True)
    together = peer.interpolate_clips(clips, (2, 2), setting)
    for b in (0, 3):
        assert np.array_equal(together[b], peer.interpolate_clips(clips[b:b + 1], (2, 2), setting)[0])


def test_motion_compensation_follows_the_motion():
    clips = squares(4, 5, seed=2)
    truth = clips[:, 1:4]
    mci = peer.interpolate_clips(clips, (1, 1), peer.Setting(mb_size=4))
    assert psnr(mci, truth) > psnr(peer.interpolate_clips(clips, (1, 1), peer.BLEND), truth) + 1.0


def test_whole_video_at_n_times_the_rate_keeps_its_frames():
    video = squares(1, 24, size=64)[0, ::3]  # 8 frames, every third of the truth
    for setting in (peer.BLEND, peer.Setting(mb_size=8)):
        out = demo_upsample.interpolate_video(video, 3, setting)
        assert out.shape == (22, 64, 64, 3)
        assert np.array_equal(out[::3], video)


def test_grid_fits_the_frame_size():
    assert len(peer.mci_grid(32)) == 12 and {s.mb_size for s in peer.mci_grid(16)} == {4, 8}
    assert len({s.name for s in peer.mci_grid(64)}) == len({s.options() for s in peer.mci_grid(64)}) == 12
    assert peer.Setting(mb_size=4, mc_mode="aobmc", vsbmc=True).name == \
        "ffmpeg minterpolate mci (mb_size 4, bidir, aobmc, vsbmc)"
    assert "scd=none" in peer.BLEND.options()


def test_a_failing_ffmpeg_is_one_line():
    with pytest.raises(peer.PeerError, match=r"returned 0 frames, expected 1 \(.*\)$"):
        peer.interpolate_clips(squares(1, 3, size=16), (1, 1), peer.Setting(mb_size=16))  # 16 px: one block


def test_evaluate_peer_rows(ckpt, val_shards, tmp_path):
    out = tmp_path / "eval.json"
    rc = ev.main(["--ckpt", str(ckpt), "--shards", val_shards, "--num", "4", "--batch_size", "3", "--steps", "1",
                  "--device", "cpu", "--peer", "minterpolate", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    names = [r["method"] for r in result["rows"]]
    assert names[:3] == ["copy nearest context", "linear blend", "ffmpeg minterpolate blend"]
    assert names[3].startswith("ffmpeg minterpolate mci (mb_size ") and names[4].startswith("model ddim-")
    # Same clips, same frames: the peer's blend is the linear blend row up to 8-bit rounding.
    assert rows["ffmpeg minterpolate blend"]["psnr"] == pytest.approx(rows["linear blend"]["psnr"], abs=0.1)
    p = result["peer"]
    assert len(p["grid"]) == 8 and p["settings"]["ffmpeg minterpolate blend"] == "mi_mode=blend:scd=none"
    best = max(p["grid"].values(), key=lambda g: g["psnr"])
    assert rows[names[3]]["psnr"] == best["psnr"] and p["settings"][names[3]] in p["grid"]
    assert p["program"].startswith("ffmpeg minterpolate (ffmpeg version")
    # The peer counts among the baselines the summary's margins are taken over.
    top = max(rows[n]["psnr"] for n in names[:4])
    assert result["summary"]["best_baseline_psnr"]["psnr"] == top
    for r in result["rows"]:  # the temporal measure: one number a row, per clip and averaged
        assert r["flicker"] > 0 and "flicker_per_position" not in r
