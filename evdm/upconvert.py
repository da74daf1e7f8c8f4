"""Whole videos at N times their frame rate with a context (1, 1), T = N + 1 checkpoint: each pair of consecutive
input frames is a window whose N - 1 middle frames the model generates, so F input frames become (F - 1) x N + 1,
input frame i at output frame i x N, byte for byte. Videos stream through two ffmpeg pipes (preprocess.video's
decoder, an encoder copying the sound), a batch of windows in memory; `upconvert_array` runs on frames in memory."""

import contextlib
import errno
import itertools
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Callable

import numpy as np
import torch

from evdm.atomic import atomic_write
from evdm.cli import warn
from evdm.config import RunConfig, SampleConfig
from evdm.denoiser import Denoiser
from evdm.ffmpeg import ffmpeg_exe
from evdm.sample_io import batched
from evdm.seeds import mix_seed

FALLBACK_FPS = 25.0  # a source that states no frame rate (raw streams)
LOSSLESS_SUFFIXES = {".mkv": ["-c:v", "ffv1"]}  # exact frames, for scoring; other suffixes: H.264
H264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18"]


class UpconvertError(RuntimeError):
    """A user-facing problem (checkpoint layout, input or output video); the message is one line."""


def factor_of(cfg: RunConfig) -> int:
    """N, the frame-rate factor of a checkpoint: T - 1 for context (1, 1); UpconvertError otherwise."""
    (Ks, Ke), T = cfg.context, cfg.data.T
    if (Ks, Ke) != (1, 1):
        raise UpconvertError(f"up-conversion needs a checkpoint with context (1, 1) and T = N + 1 (one observed "
                             f"frame at each end, N - 1 generated between); this one has context ({Ks}, {Ke}), T {T}")
    return T - 1


def upconvert_frames(frames: Iterable[np.ndarray], denoiser: Denoiser, sample_cfg: SampleConfig, *,
                     batch_size: int = 16, seed: int = 0) -> Iterator[np.ndarray]:
    """The output frames, in order, of input frames uint8 [H, W, C] (any iterable, read at most batch_size
    windows ahead of the output). Batch i of windows is sampled with the generator seeded mix_seed(seed, i)."""
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        return
    yield first
    windows = itertools.pairwise(itertools.chain([first], frames))
    for index, batch in enumerate(batched(windows, batch_size)):
        starts, ends = (np.stack([pair[i] for pair in batch])[:, None] for i in (0, 1))  # [B, 1, H, W, C]
        generator = torch.Generator(device=denoiser.device).manual_seed(mix_seed(seed, index))
        for clip in denoiser.generate_u8(starts, ends, sample_cfg, generator=generator):
            yield from clip[1:]  # the generated frames, then the end frame (the next window's start)


def upconvert_array(frames: np.ndarray, denoiser: Denoiser, sample_cfg: SampleConfig, *, batch_size: int = 16,
                    seed: int = 0) -> np.ndarray:
    """upconvert_frames of frames in memory: uint8 [F, H, W, C] -> [(F - 1) x N + 1, H, W, C]."""
    return np.stack(list(upconvert_frames(frames, denoiser, sample_cfg, batch_size=batch_size, seed=seed)))


def decoded_frames(path: str | Path, size: int, color_mode: str) -> Iterator[np.ndarray]:
    """The frames of a video as preprocess decodes them for training (every frame kept), uint8 [size, size, C],
    one at a time. After the last frame, VideoError when ffmpeg reported an error or gave no frame."""
    from preprocess.video import VideoError, decode_args, error_lines, explain_failure

    channels = 1 if color_mode == "gray" else 3
    frame_bytes, count = size * size * channels, 0
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a long log cannot stall the decoder
        proc = subprocess.Popen(decode_args(path, size, color_mode), stdout=subprocess.PIPE, stderr=log)
        try:
            while chunk := proc.stdout.read(frame_bytes):
                if len(chunk) < frame_bytes:
                    raise VideoError(f"ffmpeg's output ended inside a frame ({len(chunk)} of {frame_bytes} bytes)")
                count += 1
                yield np.frombuffer(chunk, np.uint8).reshape(size, size, channels)
        finally:  # also when the reader stops early: no decoder left running
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            returncode = proc.wait()
        text = read_log(log)
        if returncode or error_lines(text):
            raise VideoError(explain_failure(text))
        if count == 0:
            raise VideoError("zero frames decoded")


def read_log(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")


def encoder_args(out: Path, source: Path, size: int, color_mode: str, rate: str) -> list[str]:
    """ffmpeg reading raw frames from stdin at `rate` and the source's sound (if any, copied) into `out`."""
    from preprocess.video import PIX_FMTS

    codec = LOSSLESS_SUFFIXES.get(out.suffix.lower(), H264)
    return [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo",
            "-pix_fmt", PIX_FMTS[color_mode], "-s", f"{size}x{size}", "-r", rate, "-i", "pipe:",
            "-i", f"file:{source.resolve()}",
            "-map", "0:v:0", "-map", "1:a?", "-c:a", "copy", *codec, f"file:{out.resolve()}"]


def encode(frames: Iterable[np.ndarray], args: list[str], out: Path) -> int:
    """Write frames to an encoder started with `args`; returns how many. UpconvertError with ffmpeg's first
    error line when it fails (OSError ENOSPC when that is the disk filling up)."""
    count = 0
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stderr=log, bufsize=0)
        try:
            for frame in frames:
                proc.stdin.write(frame.tobytes())
                count += 1
            proc.stdin.close()
        except BrokenPipeError:  # the encoder stopped: its log says why
            pass
        finally:  # on an error upstream (the decoder, the model) the encoder is stopped, its file dropped
            if proc.poll() is None and not proc.stdin.closed:
                proc.kill()
            proc.stdin.close()
            returncode = proc.wait()
        text = read_log(log).strip()
    if returncode:
        if "No space left on device" in text:
            raise OSError(errno.ENOSPC, f"{out}: no space left on the device")
        first = text.splitlines()[0] if text else f"exit status {returncode}"
        raise UpconvertError(f"{out}: ffmpeg could not write the video ({first})")
    return count


def upconvert_video(source: str | Path, out: str | Path, denoiser: Denoiser, cfg: RunConfig, *, batch_size: int = 16,
                    seed: int = 0, progress: bool = True) -> dict:
    """Up-convert the video `source` into `out` (atomically) at N times its rate with cfg.sample's settings:
    .mkv output is lossless (FFV1), other suffixes H.264 (yuv420p, CRF 18). Returns a record: frames in and out,
    rates, seconds, output frames/s. UpconvertError (one line) for a missing, damaged, zero- or one-frame video."""
    from preprocess.video import VideoError, probe, rate_arg

    source, out, factor = Path(source), Path(out), factor_of(cfg)
    try:
        fps = probe(source).fps
        if fps is None:
            warn(f"{source}: the video states no frame rate; taking {FALLBACK_FPS:g} frames/s")
            fps = FALLBACK_FPS
        frames = decoded_frames(source, cfg.data.size, cfg.data.color_mode)
        head = list(itertools.islice(frames, 2))  # one frame has no window: refused before the encoder starts
    except VideoError as err:
        raise UpconvertError(f"{source}: {err}") from None
    if len(head) < 2:
        raise UpconvertError(f"{source}: one frame decoded; up-conversion needs at least two")
    record = dict(source=str(source), out=str(out), factor=factor, fps_in=fps, fps_out=fps * factor)
    started = time.perf_counter()

    def write(tmp: Path) -> None:
        generated = upconvert_frames(itertools.chain(head, frames), denoiser, cfg.sample, batch_size=batch_size,
                                     seed=seed)
        args = encoder_args(tmp, source, cfg.data.size, cfg.data.color_mode, rate_arg(fps * factor))
        try:
            with rate_bar(progress) as counted:
                record["frames_out"] = encode(counted(generated), args, out)
        except VideoError as err:  # raised by the decoder after its last frame
            raise UpconvertError(f"{source}: {err}") from None

    atomic_write(out, write, keep_extension=True)
    seconds = time.perf_counter() - started
    record.update(frames_in=(record["frames_out"] - 1) // factor + 1, seconds=round(seconds, 2),
                  frames_per_s=round(record["frames_out"] / seconds, 2))
    return record


@contextlib.contextmanager
def rate_bar(show: bool) -> Iterator[Callable[[Iterable[np.ndarray]], Iterator[np.ndarray]]]:
    """A frames and frames/s progress line (unless not `show`); yields `counted`, which counts frames through."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("up-converting: {task.completed:.0f} frames, {task.fields[rate]} frames/s"),
               TimeElapsedColumn())
    with Progress(*columns, disable=not show) as bar:
        task = bar.add_task("", total=None, rate="-")
        started = time.perf_counter()

        def counted(frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
            for done, frame in enumerate(frames, 1):
                yield frame
                bar.update(task, completed=done, rate=f"{done / (time.perf_counter() - started):.1f}")

        yield counted
