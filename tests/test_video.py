"""Decoding, cropping, resizing and clip cutting (preprocess.video, preprocess.decode_av)."""

import subprocess

import numpy as np
import pytest

from evdm.ffmpeg import ffmpeg_exe, write_mp4
from preprocess.synth import render_video
from preprocess.video import (
    VideoError, clip_starts, cut_all_clips, cut_clips, decode_ffmpeg, filter_chain, frame_changes, logged_rate,
    orient_filters, parse_stream_info, probe, rate_arg, rotation_degrees, spread,
)

LOG = """\
[info] Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'x.mp4':
[info]   Duration: 00:00:03.00, start: 0.000000, bitrate: 38 kb/s
[info]   Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(tv, bt709, progressive), 80x48 [SAR 1:1 DAR 5:3], 35 kb/s, 29.97 fps, 29.97 tbr, 30k tbn (default)
[info] Stream mapping:
[info] Output #0, rawvideo, to 'pipe:':
[info]   Stream #0:0(und): Video: rawvideo (RGB[24] / 0x18424752), rgb24, 16x16, q=2-31, 10 fps
"""


def direct_decode(path, vf, pix_fmt, size):
    """An independent ffmpeg decode, written out by hand, to compare against."""
    cmd = [ffmpeg_exe(), "-v", "error", "-i", str(path), "-vf", vf, "-f", "rawvideo", "-pix_fmt", pix_fmt, "pipe:"]
    raw = subprocess.run(cmd, capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, size, size, 3 if pix_fmt == "rgb24" else 1)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    square = render_video((1,), frames=9, size=24)
    # 40 x 24, not square: the left and right 8 columns must be cropped away.
    wide = np.concatenate([np.zeros((9, 24, 8, 3), np.uint8), square, np.full((9, 24, 8, 3), 255, np.uint8)], 2)
    write_mp4(square, d / "square.mp4", fps=10)
    write_mp4(wide, d / "wide.mp4", fps=25)
    (d / "text.mp4").write_text("not a video\n")
    (d / "empty.mp4").write_bytes(b"")
    whole = (d / "square.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "color=c=red:s=16x16:r=10",
                    "-frames:v", "0", "-c:v", "libx264", str(d / "zero.mp4")], check=True)
    # moov first (faststart), then cut: the header survives and decoding fails part-way.
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(d / "square.mp4"), "-c", "copy",
                    "-movflags", "+faststart", str(d / "faststart.mp4")], check=True)
    fs = (d / "faststart.mp4").read_bytes()
    (d / "cut_faststart.mp4").write_bytes(fs[: int(len(fs) * 0.6)])
    (d / "dangling.mp4").symlink_to(d / "nowhere")
    return d


@pytest.mark.parametrize("n, T, fs, cs, expected", [
    (30, 8, 1, None, [0, 8, 16]),       # non-overlapping by default
    (30, 8, 1, 4, [0, 4, 8, 12, 16, 20]),
    (30, 8, 2, None, [0]),              # a clip spans 15 frames, clips 16 apart
    (30, 8, 2, 5, [0, 5, 10, 15]),
    (8, 8, 1, None, [0]),               # exactly one clip
    (7, 8, 1, None, []),                # too short
    (14, 8, 2, None, []),               # span 15 > 14
])
def test_clip_starts(n, T, fs, cs, expected):
    assert clip_starts(n, T, fs, cs) == expected


def test_cut_clips_takes_every_stride_th_frame():
    frames = np.arange(20, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
    clips = cut_clips(frames, [0, 5], T=3, frame_stride=4)
    assert clips.shape == (2, 3, 2, 2, 1)
    assert clips[:, :, 0, 0, 0].tolist() == [[0, 4, 8], [5, 9, 13]]


def test_parse_stream_info_reads_the_input_stream_only():
    info = parse_stream_info(LOG)
    assert (info.width, info.height) == (80, 48)
    assert info.fps == pytest.approx(29.97)
    assert parse_stream_info("[info] Input #0, wav\n[info]   Stream #0:0: Audio: pcm_s16le, 44100 Hz") is None


ROTATED_LOG = """\
[info] Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'phone.mov':
[info]   Stream #0:0[0x1](und): Video: hevc (Main), yuv420p(tv, bt709), 1920x1080 [SAR 4:3 DAR 64:27], 29.98 fps, 30 tbr, 600 tbn (default)
[info]       Side data:
[info]         Display Matrix: rotation of -90.00 degrees
[info]   Stream #0:1[0x2](und): Audio: aac (LC), 44100 Hz, stereo
[info]       Side data:
[info]         Display Matrix: rotation of 180.00 degrees
"""


def test_parse_stream_info_reads_sar_and_rotation():
    info = parse_stream_info(ROTATED_LOG)
    assert (info.width, info.height, info.fps, info.sar, info.rotation) == (1920, 1080, 29.98, "4:3", 270)
    plain = parse_stream_info(LOG)
    assert (plain.sar, plain.rotation) == ("1:1", 0)


def matrix(degrees: int, hflip: bool = False) -> list[int]:
    """av_display_rotation_set (counter-clockwise degrees), then av_display_matrix_flip, in 16.16 fixed point."""
    import math

    c, s = round(math.cos(math.radians(degrees)) * 65536), round(math.sin(math.radians(degrees)) * 65536)
    m = [c, -s, 0, s, c, 0, 0, 0, 1 << 30]
    if hflip:
        m[0], m[3] = -m[0], -m[3]
    return m


@pytest.mark.parametrize("degrees, hflip, filters", [
    (0, False, []),
    (90, False, [("transpose", "cclock")]),  # shown turned 90 degrees counter-clockwise
    (-90, False, [("transpose", "clock")]),
    (180, False, [("hflip", None), ("vflip", None)]),
    (90, True, [("transpose", "clock_flip")]),
    (0, True, [("hflip", None)]),  # a mirror reads as 180 degrees with one flip: hflip alone
    (45, False, [("rotate", "315.000000*PI/180")]),  # odd angles: the rotate filter, angle in [0, 360)
])
def test_orient_filters_mirror_ffmpeg_autorotate(degrees, hflip, filters):
    assert orient_filters(matrix(degrees, hflip)) == filters
    assert orient_filters(None) == []


def test_rotation_degrees_as_ffmpeg_logs_it():
    assert [rotation_degrees(matrix(d)) for d in (0, 90, -90, 180)] == [0, 90, 270, 180]
    assert rotation_degrees(None) == 0 and rotation_degrees([0] * 9) == 0


def test_rates_as_ffmpeg_prints_and_reads_them():
    assert [logged_rate(r) for r in (30000 / 1001, 25.0, 24000 / 1001, 0.001, 90000.0)] == [29.97, 25.0, 23.98, 0.001,
                                                                                             90000.0]
    assert [rate_arg(r) for r in (25.0, 30000 / 1001, 12.5)] == ["25/1", "30000/1001", "25/2"]
    assert filter_chain(16, "rgb", 25.0).startswith("setpts=PTS-STARTPTS,fps=25/1,crop=")
    assert "fps" not in filter_chain(16, "rgb")


@pytest.mark.parametrize("n, k, expected", [(12, 3, [2, 6, 10]), (12, 1, [6]), (5, 5, [0, 1, 2, 3, 4]),
                                            (5, 9, [0, 1, 2, 3, 4]), (4, None, [0, 1, 2, 3]), (10, 4, [1, 3, 6, 8])])
def test_spread_picks_evenly(n, k, expected):
    assert spread(n, k) == expected


def test_max_clips_keeps_evenly_spread_clips():
    frames = np.arange(50, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
    starts, clips = cut_all_clips(frames, T=4, frame_stride=1, clip_stride=4, max_clips=3)
    assert starts == [8, 24, 40] and clips[:, 0, 0, 0, 0].tolist() == [8, 24, 40]


def two_scenes(first: int, second: int, size: int = 8) -> np.ndarray:
    """uint8 [first + second, size, size, 3]: the start of one synthetic scene, then a cut to another's."""
    return np.concatenate([render_video((1, 0), 40, size)[:first], render_video((2, 0), 40, size)[:second]])


def test_scene_cut_leaves_out_the_clips_that_span_it():
    frames = two_scenes(9, 8)  # the cut lies between frames 8 and 9
    changes = frame_changes(frames)
    dark_to_light = np.array([0, 255], np.uint8).repeat(4).reshape(2, 1, 2, 2)
    assert frame_changes(dark_to_light).tolist() == frame_changes(dark_to_light[::-1]).tolist() == [1.0]
    assert changes.argmax() == 8 and changes[8] > 0.15 > np.delete(changes, 8).max()
    starts, clips = cut_all_clips(frames, T=5, frame_stride=1, clip_stride=1, scene_cut=0.15)
    assert starts == [0, 1, 2, 3, 4, 9, 10, 11, 12]  # 5, 6, 7, 8 would span it
    assert np.array_equal(clips[5], frames[9:14])
    assert cut_all_clips(frames, T=5, frame_stride=1, clip_stride=1)[0] == list(range(13))  # off: every clip
    # With a frame stride the cut counts between the sampled frames too: start 7 takes frames 7 and 9 only.
    assert cut_all_clips(frames, T=2, frame_stride=2, clip_stride=1, scene_cut=0.15)[0] == [0, 1, 2, 3, 4, 5, 6,
                                                                                           9, 10, 11, 12, 13, 14]
    with pytest.raises(VideoError, match="every clip spans a scene cut"):
        cut_all_clips(two_scenes(3, 3), T=5, frame_stride=1, clip_stride=1, scene_cut=0.15)


def test_probe(videos):
    info = probe(videos / "wide.mp4")
    assert (info.width, info.height, info.fps) == (40, 24, 25.0)
    with pytest.raises(VideoError, match="not a readable MP4"):
        probe(videos / "text.mp4")


@pytest.mark.parametrize("color_mode, pix_fmt", [("rgb", "rgb24"), ("gray", "gray")])
def test_decode_equals_direct_ffmpeg_with_crop_and_resize(videos, color_mode, pix_fmt):
    frames, info, _ = decode_ffmpeg(videos / "wide.mp4", 16, color_mode)
    assert frames.dtype == np.uint8 and frames.shape == (9, 16, 16, 1 if color_mode == "gray" else 3)
    assert (info.width, info.height) == (40, 24)
    expected = direct_decode(videos / "wide.mp4", "crop=24:24:8:0,scale=16:16:flags=area", pix_fmt, 16)
    assert np.array_equal(frames, expected)


def test_decode_at_native_size_is_lossless_against_ffmpeg(videos):
    frames, _, _ = decode_ffmpeg(videos / "square.mp4", 24)
    assert np.array_equal(frames, direct_decode(videos / "square.mp4", "null", "rgb24", 24))


def test_gray_is_the_luma_of_rgb(videos):
    rgb, _, _ = decode_ffmpeg(videos / "square.mp4", 24, "rgb")
    gray, _, _ = decode_ffmpeg(videos / "square.mp4", 24, "gray")
    luma = rgb.astype(np.float64) @ [0.299, 0.587, 0.114]
    assert np.abs(gray[..., 0] - luma).mean() < 4.0


BAD = [
    ("text.mp4", "not a readable MP4"),
    ("empty.mp4", "empty file"),
    ("truncated.mp4", "not a readable MP4"),
    ("cut_faststart.mp4", "truncated"),
    ("zero.mp4", "no video stream"),
    ("dangling.mp4", "unreadable"),
]


@pytest.mark.parametrize("name, reason", BAD)
def test_bad_videos_raise_a_clear_reason(videos, name, reason):
    with pytest.raises(VideoError, match=reason):
        decode_ffmpeg(videos / name, 16)


@pytest.mark.parametrize("name", ["square.mp4", "wide.mp4"])
@pytest.mark.parametrize("color_mode", ["rgb", "gray"])
def test_pyav_gives_the_same_pixels(videos, name, color_mode):
    decode_av = pytest.importorskip("preprocess.decode_av", reason="PyAV (av) is not installed")
    a, info_a, _ = decode_ffmpeg(videos / name, 16, color_mode)
    b, info_b, _ = decode_av.decode_pyav(videos / name, 16, color_mode)
    assert a.shape == b.shape and np.array_equal(a, b)
    assert info_a == info_b


@pytest.mark.parametrize("name, reason", BAD)
def test_pyav_rejects_bad_videos(videos, name, reason):
    decode_av = pytest.importorskip("preprocess.decode_av", reason="PyAV (av) is not installed")
    with pytest.raises(VideoError):
        decode_av.decode_pyav(videos / name, 16)


def test_write_mp4_in_rgb24_at_crf_0_is_lossless(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)  # noise: the hardest case
    write_mp4(frames, tmp_path / "exact.mp4", fps=10, crf=0, pix_fmt="rgb24")
    raw = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(tmp_path / "exact.mp4"), "-f", "rawvideo", "-pix_fmt",
                          "rgb24", "pipe:"], capture_output=True, check=True).stdout
    assert np.array_equal(np.frombuffer(raw, np.uint8).reshape(frames.shape), frames)
