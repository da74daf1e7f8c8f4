"""Up-conversion (evdm.upconvert, sample.py --video): the window arithmetic, exact input frames, output
rate, sound, streaming, the refusal of other context layouts, bad videos; and the flicker measure."""

import dataclasses
import json
import re
import subprocess
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

import demo_upsample
from conftest import moving_square, run_cli, tiny_config
from evdm import upconvert as up
from evdm.checkpoint import make_payload, save_checkpoint
from evdm.config import Context
from evdm.denoiser import Denoiser
from evdm.ffmpeg import ffmpeg_exe, write_mp4
from evdm.metrics import flicker
from evdm.models import build_model
from preprocess.video import decode_ffmpeg, probe

SIZE, N = 16, 4  # the checkpoint's frame size and factor (T = N + 1)


def random_checkpoint(path: Path, cfg) -> Path:
    """A checkpoint of cfg with random weights: the zero-initialised tensors redrawn too, so that the model
    outputs more than the blend."""
    torch.manual_seed(0)
    net = build_model(cfg)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    save_checkpoint(path, make_payload(step=0, cfg=cfg, model=net, ema=net))
    return path


@pytest.fixture(scope="module")
def ckpt4x(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("ckpt4x") / "last.pt", config4x())


class BlendDenoiser:
    """Stands in for a Denoiser of T frames (its device and generate_u8), instantly: the linear blend of
    the endpoints, in integers (no float copies of a batch to count against a memory budget)."""

    device = torch.device("cpu")

    def __init__(self, T: int) -> None:
        self.T = T

    def generate_u8(self, starts, ends, sample_cfg, *, generator=None) -> np.ndarray:
        k = np.arange(self.T, dtype=np.uint16)[:, None, None, None]
        return np.stack([((s[0] * (self.T - 1 - k) + e[0] * k) // (self.T - 1)).astype(np.uint8)
                         for s, e in zip(starts, ends)])


def config4x():
    cfg = tiny_config()
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, T=N + 1, context=Context(1, 1)))


def make_video(path: Path, *, frames: int, fps: int = 8, size: str = "48x32", audio: bool = False) -> Path:
    """A test pattern video (H.264, yuv444p) from ffmpeg's lavfi sources, with an AAC sine track if asked."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
           "-i", f"testsrc2=size={size}:rate={fps}:duration={frames / fps}"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={frames / fps}", "-c:a", "aac", "-shortest"]
    subprocess.run(cmd + ["-c:v", "libx264", "-pix_fmt", "yuv444p", "-qp", "0", str(path)], check=True)
    return path


def streams_of(path: Path) -> str:
    """ffmpeg's description of a file's streams (its `-i` log)."""
    return subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr


def run_sample(args, capsys) -> tuple[int, str]:
    """sample.py's main in this process, one sampling step without guidance (a single forward per batch)."""
    import sample

    rc = sample.main([str(a) for a in args] + ["--steps", "1", "--guidance_scale", "1"])
    return rc, capsys.readouterr().err


# ---- the window arithmetic ----------------------------------------------------------------------


def test_factor_refuses_other_context_layouts():
    assert up.factor_of(config4x()) == N
    with pytest.raises(up.UpconvertError, match=r"context \(1, 1\) and T = N \+ 1.*context \(2, 2\), T 6"):
        up.factor_of(tiny_config())


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_upconvert_array_puts_every_window_in_place(batch_size):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)  # 5 windows: batches of 2 leave one short
    out = up.upconvert_array(frames, BlendDenoiser(N + 1), config4x().sample, batch_size=batch_size)
    assert out.shape == ((6 - 1) * N + 1, SIZE, SIZE, 3) == (21, SIZE, SIZE, 3)
    assert np.array_equal(out[::N], frames)
    for i in range(5):  # window i's middle between input frames i and i + 1, in order
        assert np.array_equal(out[i * N: (i + 1) * N + 1], BlendDenoiser(N + 1).generate_u8(
            frames[None, i:i + 1], frames[None, i + 1:i + 2], None)[0])


def test_upconvert_with_the_model_keeps_the_input_frames_exactly(ckpt4x):
    denoiser = Denoiser.load(ckpt4x, torch.device("cpu"))
    cfg = denoiser.cfg
    frames = moving_square(np.random.default_rng(0), 4, SIZE)
    sc = dataclasses.replace(cfg.sample, steps=1, guidance_scale=1.0)
    out = up.upconvert_array(frames, denoiser, sc, batch_size=2)
    assert out.shape == ((4 - 1) * N + 1, SIZE, SIZE, 3)
    assert np.array_equal(out[::N], frames)
    generated = np.delete(out, np.arange(0, len(out), N), axis=0)
    assert not any(np.array_equal(g, f) for g in generated for f in frames)  # the model made them


def test_upconvert_reads_the_input_as_it_goes():
    """At most a batch of windows is read ahead of the output: a stream longer than any batch never sits in memory."""
    denoiser, cfg = BlendDenoiser(N + 1), config4x()
    rng = np.random.default_rng(1)
    read = []

    def source():
        for i in range(40):
            read.append(i)
            yield rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)

    ahead = []
    for index, _ in enumerate(up.upconvert_frames(source(), denoiser, cfg.sample, batch_size=4)):
        needed = index // N + 1  # input frames the output so far contains
        ahead.append(len(read) - needed)
    assert len(read) == 40 and index + 1 == (40 - 1) * N + 1
    assert max(ahead) <= 4  # one batch of 4 windows


# ---- videos through sample.py --video -----------------------------------------------------------------


def test_sample_py_video_lossless_keeps_frames_rate_and_sound(ckpt4x, tmp_path, capsys):
    src = make_video(tmp_path / "in.mp4", frames=10, fps=8, audio=True)
    out = tmp_path / "out.mkv"
    rc, err = run_sample(["--ckpt", ckpt4x, "--video", src, "--out", out, "--batch_size", 3], capsys)
    assert rc == 0, err
    frames, info, _ = decode_ffmpeg(out, SIZE)  # already SIZE px: the chain is a no-op on it
    source, _, _ = decode_ffmpeg(src, SIZE)  # the training shards' preprocessing of the input
    assert len(source) == 10 and frames.shape == ((10 - 1) * N + 1, SIZE, SIZE, 3)
    assert np.array_equal(frames[::N], source)  # the crop, resize and colour of training
    assert info.fps == 32  # N times the input's 8 fps
    assert re.search(r"Audio: aac", streams_of(out))  # copied, not re-encoded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mkv"]  # no temporary file left


def test_sample_py_video_mp4_without_sound(ckpt4x, tmp_path, capsys):
    src = tmp_path / "in.mp4"
    write_mp4(np.stack([moving_square(np.random.default_rng(2), 5, 32)[f] for f in range(5)]), src, fps=10, crf=0,
              pix_fmt="yuv444p")
    out = tmp_path / "out.mp4"
    rc, err = run_sample(["--ckpt", ckpt4x, "--video", src, "--out", out], capsys)
    assert rc == 0, err
    frames, info, _ = decode_ffmpeg(out, SIZE)
    source, _, _ = decode_ffmpeg(src, SIZE)
    assert frames.shape[0] == 17 and info.fps == 40 and "Audio:" not in streams_of(out)
    # H.264 4:2:0 is lossy: the input frames are there up to its rounding.
    assert np.abs(frames[::N].astype(int) - source).mean() < 4


MEMORY_BUDGET = 400 * 1024  # bytes Python may hold at its peak while up-converting, batch 8 at 16 px


def test_streaming_a_video_longer_than_the_memory_budget(tmp_path):
    """A video whose decoded frames alone (1,200 x 16 x 16 x 3 bytes) exceed the budget streams within it:
    decoder and encoder are pipes, and only a batch of windows is held (numpy and Python allocations,
    traced; modules are imported by a short run first)."""
    denoiser, cfg = BlendDenoiser(N + 1), config4x()
    src = make_video(tmp_path / "long.mp4", frames=1200, fps=25, size="32x32")
    up.upconvert_video(make_video(tmp_path / "short.mp4", frames=3), tmp_path / "short.mkv", denoiser, cfg,
                       progress=False)
    tracemalloc.start()
    try:
        record = up.upconvert_video(src, tmp_path / "long.mkv", denoiser, cfg, batch_size=8, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert record["frames_in"] == 1200 and record["frames_out"] == (1200 - 1) * N + 1
    assert peak < MEMORY_BUDGET < 1200 * SIZE * SIZE * 3, peak


def test_sample_py_video_refuses_another_context_layout(tmp_path, capsys):
    ckpt = random_checkpoint(tmp_path / "clip.pt", tiny_config())  # context (2, 2), T 6
    src = make_video(tmp_path / "in.mp4", frames=3)
    rc, err = run_sample(["--ckpt", ckpt, "--video", src, "--out", tmp_path / "o.mp4"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "context (1, 1) and T = N + 1" in err and "context (2, 2)" in err
    assert not (tmp_path / "o.mp4").exists()


def zero_frame_video(path: Path) -> Path:
    """A Matroska file with a video stream that holds no frame (every packet dropped), beside a sound track."""
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=32x32:duration=0.5", "-f", "lavfi", "-i", "sine=duration=0.5", "-map", "0:v",
                    "-map", "1:a", "-c:v", "ffv1", "-bsf:v", "noise=drop=1", "-c:a", "aac", "-f", "matroska",
                    str(path)], check=True)
    assert probe(path).width == 32  # the stream is there
    return path


@pytest.mark.parametrize("kind", ["missing", "damaged", "not a video", "zero frames", "one frame"])
def test_bad_videos_are_one_line_exit_2(ckpt4x, tmp_path, capsys, kind):
    src = tmp_path / "in.mp4"
    if kind == "damaged":
        data = make_video(tmp_path / "good.mp4", frames=30, size="64x64").read_bytes()
        src.write_bytes(data[: len(data) // 2])
    elif kind == "not a video":
        src.write_bytes(b"\x00\x01garbage" * 100)
    elif kind == "zero frames":
        zero_frame_video(src)
    elif kind == "one frame":
        make_video(src, frames=1)
    out = tmp_path / "out.mp4"
    rc, err = run_sample(["--ckpt", ckpt4x, "--video", src, "--out", out], capsys)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(src) in err
    assert not out.exists() and not list(tmp_path.glob("out.mp4.tmp*"))


def test_video_flags_go_together(ckpt4x, tmp_path, capsys):
    import sample

    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(ckpt4x), "--video", str(tmp_path / "in.mp4")])
    assert "--video and --out go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(ckpt4x), "--video", "a.mp4", "--out", "b.mp4", "--shards", "x"])


# ---- the flicker measure -------------------------------------------------------------------------


def glide(frames: int, size: int = 16) -> np.ndarray:
    """uint8 [frames, size, size, 3]: a bright 4 px square moving one pixel a frame to the right."""
    video = np.full((frames, size, size, 3), 40, np.uint8)
    for f in range(frames):
        video[f, 6:10, 1 + f:5 + f] = 220
    return video


def test_flicker_of_the_truth_is_one_and_a_jittered_frame_scores_worse():
    truth = glide(9)
    unit = lambda v: torch.from_numpy(v).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    assert float(flicker(unit(truth), unit(truth))) == pytest.approx(1.0)
    jittered = truth.copy()
    jittered[3] = np.roll(truth[3], 3, axis=0)  # one frame jumps away from its neighbours
    assert float(flicker(unit(jittered), unit(truth))) > 1.3
    still = np.repeat(truth[:1], 9, axis=0)
    assert float(flicker(unit(still), unit(truth))) == 0.0  # no motion at all: below the truth's


def test_window_flicker_sees_a_jump_at_a_window_boundary():
    truth = glide(9)  # F = 3 input frames at N = 4: windows 0-4 and 4-8, input frame 1 at output 4
    smooth = demo_upsample.window_flicker(truth, truth, 4)
    assert smooth == {"overall": 1.0, "boundary": 1.0, "within": 1.0}
    jumpy = truth.copy()
    jumpy[5] = np.roll(truth[5], 3, axis=0)  # the first generated frame after the shared input frame
    scores = demo_upsample.window_flicker(jumpy, truth, 4)
    assert scores["boundary"] > 1.3 and scores["boundary"] > scores["within"] > 1.0 and scores["overall"] > 1.0
    assert demo_upsample.window_flicker(truth[:5], truth[:5], 2)["within"] is None


# ---- the benchmarks' rows -------------------------------------------------------------------------


def test_bench_upconvert_smoke(tmp_path):
    out = tmp_path / "upconvert.json"
    proc = run_cli(["bench/upconvert.py", "--batch_sizes", "2", "--frames", "3", "--steps", "1", "--video", "--device",
                    "cpu", "--out", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["windows"], r.get("via")) for r in rows] == [(2, 2, None), (2, 2, "ffmpeg pipes")]
    assert all(r["frames_per_s"] > 0 and r["factor"] == 4 for r in rows) and "output frames/s" in proc.stdout


def test_gpu_check_upconvert_row_runs_on_a_cpu(tmp_path):
    """The GPU check's upconvert row (GPU runs only; here its job at --smoke scale, fp32)."""
    job = {"name": "upconvert fp32", "kind": "upconvert", "precision": "fp32", "compile": False, "batches": [2]}
    proc = run_cli(["bench/gpu_check_jobs.py", "--smoke", "--work", str(tmp_path), "--job", json.dumps(job)],
                   timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    assert len(rows) == 1 and rows[0]["status"] == "ok"
    row = rows[0]
    assert (row["windows"], row["factor"], row["forward_batch"]) == (4, 4, 4) and row["frames_per_s"] > 0
