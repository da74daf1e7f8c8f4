"""preprocess.shard on a mixed folder the tests encode with the ffmpeg binary: every container, --fps,
rotation and non-square pixels, split lists, --max-clips-per-video / --max-videos, kill -9 and rerun.

The videos are tiny (32 px, at most 2 s) so the whole module stays a few seconds per decoder.
"""

import json
import os
import signal
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from evdm.ffmpeg import ffmpeg_exe
from preprocess.inspect import main as inspect_main
from preprocess.inspect import read_samples
from preprocess.shard import Options, main, parse_args, run
from preprocess.state import PROGRESS_NAME
from preprocess.video import decode_ffmpeg

ROOT = Path(__file__).resolve().parent.parent
SECONDS = 2.0  # the moving-square videos' length: a whole number of frames at every rate below
MOTION_PX_PER_S = 100  # 4 px per frame at 25 fps in a 32 px frame: clearly different motion at 50 fps
H264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "12"]
OPTS = dict(T=4, frame_stride=1, clip_stride=4, size=16, shard_size=12, val_fraction=0.0, fps=25.0,
            max_clips_per_video=3)


@cache
def webm_codec() -> tuple[str, list[str]]:
    """AV1 when this ffmpeg can encode it (SVT-AV1, libaom, rav1e), else the closest webm codec (VP9, VP8)."""
    encoders = subprocess.run([ffmpeg_exe(), "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    names = {line.split()[1] for line in encoders.splitlines()[1:] if len(line.split()) > 1}
    # SVT-AV1's fastest preset (12) wrote undecodable streams here for some sizes and rates: 8 is as fast at 32 px.
    for name, args in [("libsvtav1", ["-preset", "8", "-crf", "20"]), ("libaom-av1", ["-cpu-used", "8", "-crf", "20"]),
                       ("librav1e", ["-speed", "10"]),
                       ("libvpx-vp9", ["-deadline", "realtime", "-crf", "20", "-b:v", "0"]),
                       ("libvpx", ["-deadline", "realtime", "-crf", "10", "-b:v", "1M"])]:
        if name in names:
            return name, ["-c:v", name, "-pix_fmt", "yuv420p", *args]
    raise RuntimeError("this ffmpeg can encode no webm video codec (AV1, VP9 or VP8)")


def encode(frames: np.ndarray, path: Path, fps: float, codec: list[str], *, vf: str | None = None) -> None:
    """uint8 [T, H, W, 3] -> a video file with the given codec arguments (the container from the name)."""
    _, h, w, _ = frames.shape
    cmd = [ffmpeg_exe(), "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps),
           "-i", "pipe:", *(["-vf", vf] if vf else []), *codec, str(path)]
    subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), check=True, capture_output=True)


def moving_square(fps: float, seconds: float = SECONDS, size: int = 32) -> np.ndarray:
    """A white 8 px square moving right at MOTION_PX_PER_S (wrapping), rendered at time k / fps."""
    n = round(fps * seconds)
    frames = np.full((n, size, size, 3), 40, np.uint8)
    frames[:, :4] = (200, 60, 60)  # a static red band: colour survives every codec
    for k in range(n):
        x = round(MOTION_PX_PER_S * k / fps) % size
        cols = (np.arange(8) + x) % size
        frames[k, 12:20, cols] = 255
    return frames


def upright_marker(n: int = 8) -> np.ndarray:
    """48 x 32 (wide) upright frames: a white block near the top-left of the central square."""
    frames = np.full((n, 32, 48, 3), 30, np.uint8)
    frames[:, 2:10, 10:18] = 255
    return frames


def stretched_circle(n: int = 8) -> np.ndarray:
    """32 x 48 stored pixels showing a circle of radius 12 once pixels are 2:1 wide (an ellipse as stored)."""
    y, x = np.mgrid[:48, :32]
    inside = ((x - 16) / 6) ** 2 + ((y - 24) / 12) ** 2 <= 1
    frames = np.full((n, 48, 32, 3), 20, np.uint8)
    frames[:, inside] = 255
    return frames


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """One folder of every container and rate, a rotated MP4, a 2:1-SAR MP4, three files that are not videos
    (.txt, .csv, and the rotated MP4's source kept as .part), a text file named .webm and a real webm
    whose frames are damaged."""
    d = tmp_path_factory.mktemp("mixed")
    encode(moving_square(25), d / "motion25.mp4", 25, H264)
    encode(moving_square(50), d / "motion50.MKV", 50, H264)  # H.264 in Matroska, upper-case extension
    (d / "avi").mkdir()
    encode(moving_square(30), d / "avi" / "motion30.avi", 30, ["-c:v", "mpeg4", "-q:v", "2"])
    # MJPEG in QuickTime, starting at 13 ms (as cut files do): resampling must not depend on where the
    # timestamps start (the ffmpeg command line shifts them to 0, PyAV does not).
    encode(moving_square(24), d / "motion24.mov", 24, ["-c:v", "mjpeg", "-q:v", "2", "-pix_fmt", "yuvj420p",
                                                         "-output_ts_offset", "0.013"])
    encode(moving_square(25), d / "motion25.webm", 25, webm_codec()[1])
    stored = np.ascontiguousarray(np.rot90(upright_marker(), k=-1, axes=(1, 2)))  # turned clockwise as stored
    encode(stored, d / "stored_sideways.mp4.part", 25, [*H264, "-f", "mp4"])
    # The display matrix says "turn 90 degrees counter-clockwise to show": the upright picture again.
    for name, flip in (("rotated.mp4", []), ("mirrored.mp4", ["-display_hflip"])):  # a selfie: turned and mirrored
        subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-display_rotation", "90", *flip,
                        "-i", str(d / "stored_sideways.mp4.part"), "-c", "copy", str(d / name)], check=True)
    encode(stretched_circle(), d / "sar.mp4", 25, H264, vf="setsar=2")
    (d / "notes.txt").write_text("not a video")
    (d / "labels.csv").write_text("path,label\n")
    (d / "broken.webm").write_text("not a webm either")
    data = bytearray((d / "motion25.webm").read_bytes())
    data[len(data) // 3:len(data) // 3 + 300] = b"\xff" * 300  # the container opens, the frames do not decode
    (d / "damaged.webm").write_bytes(bytes(data))
    return d


def shard_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}


def clips_by_source(d: Path) -> dict[str, dict[int, np.ndarray]]:
    out: dict[str, dict[int, np.ndarray]] = {}
    for tar in sorted(d.glob("*.tar")):
        for s in read_samples(tar).values():
            out.setdefault(s["meta"]["source"], {})[s["meta"]["start_frame"]] = s["clip"]
    return out


@pytest.fixture(scope="module")
def sharded(mixed, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """The mixed folder at --fps 25 with each decoder."""
    out = {}
    for decoder in ("ffmpeg", "pyav"):
        d = tmp_path_factory.mktemp(f"shards-{decoder}")
        out[decoder] = d, run(mixed, d, Options(**OPTS, decoder=decoder), workers=1)
    return out


VIDEOS = {"motion25.mp4": 25, "motion50.MKV": 50, "avi/motion30.avi": 30, "motion24.mov": 24, "motion25.webm": 25,
          "rotated.mp4": 25, "mirrored.mp4": 25, "sar.mp4": 25}


def test_every_container_is_found_decoded_and_reported(sharded):
    _, summary = sharded["ffmpeg"]
    manifest = summary.manifest.as_dict()  # as written to manifest.json
    sources = {s["path"]: s for s in manifest["sources"]}
    assert {p: s["fps"] for p, s in sources.items()} == VIDEOS
    assert manifest["source_fps"] == {"24": 1, "25": 5, "30": 1, "50": 1}
    assert manifest["scan"]["not_videos"] == {".csv": 1, ".part": 1, ".txt": 1}
    assert manifest["scan"]["videos_found"] == 10 and manifest["scan"]["videos_used"] == 10
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert reasons == {"broken.webm": "not a video (ffmpeg: Invalid data found when processing input)",
                       "damaged.webm": reasons["damaged.webm"]}
    assert reasons["damaged.webm"].startswith("damaged video stream (ffmpeg: ")
    assert {s["path"] for s in sharded["pyav"][1].manifest.skipped} == {"broken.webm", "damaged.webm"}
    # --fps 25: two seconds are 50 frames whatever the source rate; 3 clips spread over the 12 that fit.
    for path in ("motion25.mp4", "motion50.MKV", "avi/motion30.avi", "motion24.mov", "motion25.webm"):
        assert sources[path]["frames"] == 50 and sources[path]["clips"] == 3, path
    assert (sources["rotated.mp4"]["rotation"], sources["mirrored.mp4"]["rotation"], sources["sar.mp4"]["sar"]) == (
        90, 90, "2:1")
    clips = clips_by_source(sharded["ffmpeg"][0])
    assert sorted(clips["motion50.MKV"]) == [8, 24, 40]  # clips 2, 6, 10 of 0..11: the middle of each third


def test_both_decoders_write_the_same_shards(sharded):
    (ff, ff_summary), (av, av_summary) = sharded["ffmpeg"], sharded["pyav"]
    assert shard_bytes(ff) == shard_bytes(av) and shard_bytes(ff)
    assert ff_summary.manifest.sources == av_summary.manifest.sources


def square_x(frame: np.ndarray) -> float:
    """The moving square's centre column in a 16 px frame of moving_square (a circular mean: it wraps)."""
    weight = np.clip(frame[6:10].mean(axis=(0, 2)) - 40, 0, None)
    angle = 2 * np.pi * np.arange(16) / 16
    return np.arctan2((weight * np.sin(angle)).sum(), (weight * np.cos(angle)).sum()) * 16 / (2 * np.pi) % 16


def wrapped_gap(a: float, b: float) -> float:
    return abs((a - b + 8) % 16 - 8)


def test_25_and_50_fps_give_the_same_clips_at_fps_25(mixed, sharded):
    clips = clips_by_source(sharded["ffmpeg"][0])
    for start in (8, 24, 40):
        a = clips["motion25.mp4"][start].astype(float)
        for other in ("motion50.MKV", "motion25.webm"):  # every 25 fps instant exists in these
            assert np.abs(a - clips[other][start]).mean() < 3.0, (other, start)  # codec noise only
        # 24 and 30 fps sources have no frame at most 1/25 s instants: the nearest one is taken, so the
        # square is at most half a source frame's motion (at 16 px) away.
        for other, fps in (("avi/motion30.avi", 30), ("motion24.mov", 24)):
            half_frame = MOTION_PX_PER_S / fps / 2 * 16 / 32
            for t in range(4):
                assert wrapped_gap(square_x(a[t]), square_x(clips[other][start][t])) <= half_frame + 0.25
    # Without resampling, the 50 fps video's frames are half as far apart: the clips differ by far more.
    f25, _, _ = decode_ffmpeg(mixed / "motion25.mp4", 16)
    f50, _, _ = decode_ffmpeg(mixed / "motion50.MKV", 16)
    assert len(f50) == 2 * len(f25) == 100
    assert np.abs(f25[8:12].astype(float) - f50[8:12]).mean() > 3 * 3.0
    assert max(wrapped_gap(square_x(x), square_x(y)) for x, y in zip(f25[8:12], f50[8:12])) >= 2


def bright_box(frame: np.ndarray) -> tuple[slice, slice]:
    """(rows, cols) bounding box of the pixels brighter than mid-grey in a [H, W, C] frame."""
    ys, xs = np.nonzero(frame.mean(-1) > 128)
    return slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)


def test_rotation_metadata_turns_frames_upright(mixed, sharded):
    for decoder in ("ffmpeg", "pyav"):
        clips = clips_by_source(sharded[decoder][0])
        rows, cols = bright_box(next(iter(clips["rotated.mp4"].values()))[0])
        assert rows.stop <= 8 and cols.stop <= 8, (decoder, rows, cols)  # top-left, as drawn upright
        rows, cols = bright_box(next(iter(clips["mirrored.mp4"].values()))[0])
        assert rows.stop <= 8 and cols.start >= 8, (decoder, rows, cols)  # the mirror image: top-right
    # The stored frames alone (no display matrix) have the block elsewhere: the metadata did the turning.
    stored, _, _ = decode_ffmpeg(mixed / "stored_sideways.mp4.part", 16)
    rows, cols = bright_box(stored[0])
    assert cols.start >= 8


def test_non_square_pixels_keep_a_circle_round(mixed, sharded):
    for decoder in ("ffmpeg", "pyav"):
        clip = next(iter(clips_by_source(sharded[decoder][0])["sar.mp4"].values()))
        rows, cols = bright_box(clip[0])
        height, width = rows.stop - rows.start, cols.stop - cols.start
        assert 7 <= height <= 9 and abs(width - height) <= 1, (decoder, height, width)
    # Read as square pixels, the same file shows an ellipse half as wide as high.
    vf = r"setsar=1,crop=min(iw\,ih):min(iw\,ih),scale=16:16:flags=area"
    raw = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(mixed / "sar.mp4"), "-vf", vf, "-frames:v", "1",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"], capture_output=True, check=True).stdout
    rows, cols = bright_box(np.frombuffer(raw, np.uint8).reshape(16, 16, 3))
    assert (cols.stop - cols.start) * 2 <= (rows.stop - rows.start) + 1


def test_inspect_shows_the_fps_histogram(sharded, capsys):
    assert inspect_main([str(sharded["ffmpeg"][0]), "--clips", "2"]) == 0
    printed = capsys.readouterr().out
    assert "source fps (videos per rate): 24 x1, 25 x5, 30 x1, 50 x1; resampled to 25 fps" in printed
    assert "3 files that are not videos skipped (.csv 1, .part 1, .txt 1)" in printed
    assert "2 videos turned by their rotation metadata, 1 with non-square pixels corrected" in printed


# ---- split lists and --max-videos, through the command line


@pytest.fixture(scope="module")
def classes(tmp_path_factory) -> Path:
    """A UCF-101-like layout (class folders, no split in the names) plus a Kinetics-style file name."""
    d = tmp_path_factory.mktemp("classes")
    one = d / "one.avi"
    encode(moving_square(10, seconds=0.8), one, 10, ["-c:v", "mpeg4", "-q:v", "2"])
    for rel in ["ClassA/v_a1.avi", "ClassA/v_a2.avi", "ClassB/v_b1.avi", "train_here/v_b2.avi", "ClassB/v_extra.avi",
                "ClassB/abcdEFG_000010_000020.avi"]:
        (d / rel).parent.mkdir(exist_ok=True)
        (d / rel).write_bytes(one.read_bytes())
    one.unlink()
    lists = d.parent / f"{d.name}-lists"
    lists.mkdir()
    (lists / "trainlist.txt").write_text("ClassA/v_a1.avi 1\n./ClassA/v_a2.avi 1\n\nClassA/v_gone.avi 1\n")
    (lists / "val.csv").write_text("label,youtube_id\nb,v_b1\nb,v_b2\nb,abcdEFG\n")
    return d


def test_split_lists_decide_the_split_and_report_missing_names(classes, tmp_path, capsys):
    lists = classes.parent / f"{classes.name}-lists"
    out = tmp_path / "out"
    args = [str(classes), str(out), "--T", "4", "--size", "16", "--workers", "1", "--decoder", "pyav",
            "--split-list", f"train={lists / 'trainlist.txt'}", "--split-list", f"val={lists / 'val.csv'}",
            "--split-column", "youtube_id"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    splits = {s["path"]: s["split"] for s in manifest["sources"]}
    assert splits == {"ClassA/v_a1.avi": "train", "ClassA/v_a2.avi": "train", "ClassB/v_b1.avi": "val",
                      "train_here/v_b2.avi": "val",  # the list beats the folder name
                      "ClassB/abcdEFG_000010_000020.avi": "val"}
    assert manifest["scan"]["listed_missing"] == ["ClassA/v_gone.avi"] and manifest["scan"]["unlisted"] == 1
    printed = capsys.readouterr().out
    assert "1 names in the split lists match no video: ClassA/v_gone.avi" in printed
    assert "1 videos named by no split list left out" in printed
    # A CSV without the column is one clear line, exit 2.
    assert main(args[:-1] + ["label_id"]) == 2
    assert "no column 'label_id' (columns: label, youtube_id)" in capsys.readouterr().err
    # The trainer reads the new manifest as it reads the old ones (its new fields are additive).
    from evdm.config import load_config
    from evdm.data.shardset import open_checked

    cfg = load_config(ROOT / "configs" / "smoke.toml", [f'data.train_shards="{out}/train-*.tar"',
                                                        f'data.val_shards="{out}/val-*.tar"', "data.T=4",
                                                        "data.size=16", "data.endpoint_context=1"])
    train, _ = open_checked(cfg)
    assert train.problems() == []
    assert train.clip_count() == manifest["splits"]["train"]["clips"] > 0


def test_inspect_reads_a_manifest_without_the_new_fields(tmp_path, capsys):
    from conftest import write_square_shards  # shards with a manifest as older versions wrote it

    write_square_shards(tmp_path, T=4, size=8, train_shards=1, per_shard=2)
    assert "sources" not in json.loads((tmp_path / "manifest.json").read_text())
    assert inspect_main([str(tmp_path), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "train: 1 videos, 2 clips, 1 shards" in printed and "source fps" not in printed


def test_max_videos_is_a_reproducible_choice(classes, tmp_path):
    opts = Options(T=4, size=16, clip_stride=4, decoder="pyav", max_videos=3, val_fraction=0.0)
    first = run(classes, tmp_path / "a", opts)
    again = run(classes, tmp_path / "b", opts)
    used = sorted(s["path"] for s in first.manifest.sources)
    assert len(used) == 3 and used == sorted(s["path"] for s in again.manifest.sources)
    assert first.manifest.scan["over_max_videos"] == 3
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


# ---- kill -9 in the middle, rerun: the same bytes as a straight run


def test_kill_9_and_rerun_is_byte_identical(mixed, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("\n".join(["motion25.mp4", "motion50.MKV", "avi/motion30.avi", "motion24.mov",
                                                "rotated.mp4", "broken.webm"]))
    (lists / "val.txt").write_text("motion25.webm\nsar.mp4\n")
    argv = lambda out: [str(mixed), str(out), "--T", "4", "--size", "16", "--shard-size", "1", "--workers", "1",
                        "--fps", "25", "--max-clips-per-video", "2", "--split-list", f"train={lists / 'train.txt'}",
                        "--split-list", f"val={lists / 'val.txt'}", "--ext", "mp4,mkv,avi,mov,webm"]
    straight = tmp_path / "straight"
    run(mixed, straight, parse_args(argv(straight))[1])

    # A slow ffmpeg (a wrapper that sleeps first) so the kill lands between shards, every time.
    slow = tmp_path / "slow-ffmpeg"
    slow.write_text(f"#!/bin/sh\nsleep 0.15\nexec '{ffmpeg_exe()}' \"$@\"\n")
    slow.chmod(0o755)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "preprocess.shard", *argv(killed)], cwd=ROOT,
                            env=dict(os.environ, EVDM_FFMPEG=str(slow)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        progress = killed / PROGRESS_NAME
        try:
            done = len(json.loads(progress.read_text())["shards"]) if progress.exists() else 0
        except ValueError:  # never half-written (atomic), but be safe
            done = 0
        if done >= 2:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    assert not (killed / "manifest.json").exists() and list(killed.glob("*.tar"))

    rerun = subprocess.run([sys.executable, "-m", "preprocess.shard", *argv(killed)], cwd=ROOT, capture_output=True,
                           text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "shards reused" in rerun.stdout
    assert shard_bytes(killed) == shard_bytes(straight)
    assert (killed / "manifest.json").read_bytes() == (straight / "manifest.json").read_bytes()


@pytest.mark.parametrize("flags, message", [
    (["--fps", "0"], "the frame rate must be > 0"),
    (["--fps", "fast"], "not a frame rate: 'fast'"),
    (["--split-list", "dev=list.txt"], "--split-list wants SPLIT=FILE"),
    (["--max-videos", "0"], "--max-videos must be >= 1"),
    (["--max-clips-per-video", "-1"], "--max-clips-per-video must be >= 1"),
    (["--ext", ",."], "--ext names no extension"),
    (["--scene-cut", "1"], "--scene-cut must be in (0, 1)"),
])
def test_bad_flags_are_one_usage_error(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["data", "shards", *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_flags_become_options():
    _, opts = parse_args(["data", "shards", "--fps", "30000/1001", "--ext", "AVI", "--ext", ".mkv,webm",
                          "--split-list", "test=t.txt", "--max-clips-per-video", "4", "--scene-cut", "0.2"])
    assert opts.fps == 30000 / 1001 and opts.extensions == (".avi", ".mkv", ".webm")
    assert opts.split_lists == (("test", "t.txt"),) and opts.max_clips_per_video == 4 and opts.max_videos is None
    assert opts.scene_cut == 0.2 and parse_args(["data", "shards"])[1].scene_cut is None
