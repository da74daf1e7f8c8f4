"""Pictures keep the exact frames, frame context and generated frames differently, and write files."""

import numpy as np
import pytest
from PIL import Image

from conftest import frame_at
from evdm import visualize as vis
from evdm.config import Context

K2, K1 = Context(2, 2), Context(1, 1)


@pytest.fixture
def clip():
    return np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)


def test_strip_holds_every_frame_exactly_and_frames_context_differently(clip, tmp_path):
    K = 2
    vis.save_png(vis.frame_strip(clip, K2, scale=3), tmp_path / "s.png")
    img = np.asarray(Image.open(tmp_path / "s.png"))
    for t in range(6):
        assert np.array_equal(frame_at(img, 0, t, 16, 16, scale=3), clip[t])
        y, x = vis.cell_origin(0, t, 16, 16, scale=3, border=2, gap=2)
        expected = vis.CONTEXT_COLOR if t < K or t >= 6 - K else vis.GENERATED_COLOR
        assert tuple(img[y - 1, x - 1]) == expected


def test_gray_frames_become_rgb(clip):
    gray = clip[..., :1]
    img = vis.frame_strip(gray, K1)
    assert img.shape[-1] == 3
    assert np.array_equal(frame_at(img, 0, 3, 16, 16), np.repeat(gray[3], 3, -1))


def test_comparison_strip_rows(clip):
    sample = clip[::-1].copy()
    img = vis.comparison_strip(clip, sample, K2)
    assert np.array_equal(frame_at(img, 0, 4, 16, 16), clip[4])
    assert np.array_equal(frame_at(img, 1, 4, 16, 16), sample[4])
    with pytest.raises(ValueError):
        vis.comparison_strip(clip, sample[:5], K2)


def test_batch_grid_gif_and_mp4(clip, tmp_path):
    clips = np.stack([clip, clip[::-1], clip, clip[:, ::-1]])
    frames = vis.batch_grid_frames(clips, K2, scale=2)
    assert frames.shape[0] == 6
    assert np.array_equal(frame_at(frames[3], 1, 0, 16, 16, scale=2), clips[2, 3])
    vis.save_gif(frames, tmp_path / "g.gif")
    with Image.open(tmp_path / "g.gif") as gif:
        assert gif.n_frames == 6
    vis.save_video(clip, tmp_path / "v.mp4", scale=4)
    assert (tmp_path / "v.mp4").stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp*"))


def test_rejects_non_uint8(clip):
    with pytest.raises(ValueError):
        vis.frame_strip(clip.astype(np.float32), K2)


def test_asymmetric_context_frames_each_end_by_its_own_count(clip):
    colors = vis.frame_colors(6, Context(1, 2), vis.GENERATED_COLOR)
    assert colors == [vis.CONTEXT_COLOR] + [vis.GENERATED_COLOR] * 3 + [vis.CONTEXT_COLOR] * 2
