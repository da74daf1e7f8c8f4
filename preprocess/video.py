"""Decode one video to square uint8 frames and cut it into clips. Torch-free.

Decoding runs ffmpeg (via ffmpeg-python) as one subprocess writing raw frames to a pipe. Cropping
and resizing happen inside ffmpeg's filter graph (`filter_chain`), which preprocess.decode_av reuses
so both backends give the same pixels. ffprobe is not assumed (imageio-ffmpeg ships none): the
stream's size and fps are read from ffmpeg's own log, printed with a level tag on every line so
that errors can be told apart from information reliably. Frames that arrive decoded (BAIR's raw
arrays) are resized and converted in numpy instead (`prepare_frames`).
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import numpy as np
from PIL import Image

from evdm.ffmpeg import ffmpeg_exe
from evdm.schema import COLOR_CHANNELS

PIX_FMTS = {"rgb": "rgb24", "gray": "gray"}
# level+info: every log line carries "[info]", "[error]", ... so errors are found by tag, not wording.
_GLOBAL_ARGS = ["-hide_banner", "-nostdin", "-loglevel", "level+info"]
_STREAM_RE = re.compile(r"Stream #\d+:\d+.*?: Video: (?P<rest>.*)")
_SIZE_RE = re.compile(r"(?:^|[ ,])(?P<w>\d{1,5})x(?P<h>\d{1,5})(?:[ ,\[]|$)")
_FPS_RE = re.compile(r"(?P<v>\d+(?:\.\d+)?)(?P<k>k?) (?:fps|tbr)")
LUMA_601 = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma weights
_TAG_RE = re.compile(r"^(?:\[[^\]]*@ 0x[0-9a-f]+\] )*\[(?P<level>error|fatal|panic)\] (?P<msg>.*)$")


class VideoError(Exception):
    """A video that cannot be used; str() is the one-line reason for the summary and manifest."""


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float | None  # None when the container states no rate


def parse_stream_info(log: str) -> VideoInfo | None:
    """The first input video stream's size and fps from ffmpeg's `-i` log, or None if it has none."""
    # Only the input section: the output section repeats "Video:" with the converted size.
    log = re.split(r"^(?:\[info\] )?(?:Stream mapping:|Output #0)", log, maxsplit=1, flags=re.M)[0]
    for line in log.splitlines():
        match = _STREAM_RE.search(line)
        if not match:
            continue
        rest = match["rest"]
        size = _SIZE_RE.search(rest)
        if not size:
            continue
        fps = _FPS_RE.search(rest)
        rate = float(fps["v"]) * (1000 if fps["k"] else 1) if fps else None
        return VideoInfo(int(size["w"]), int(size["h"]), rate)
    return None


def error_lines(log: str) -> list[str]:
    """Messages of the lines ffmpeg logged at error level or worse, without their [tags]."""
    return [m["msg"].strip() for m in map(_TAG_RE.match, log.splitlines()) if m]


def explain_failure(log: str) -> str:
    """A one-line reason for a failed or damaged decode, from ffmpeg's log."""
    errors = error_lines(log)
    text = "\n".join(errors)
    if "moov atom not found" in text:
        return "not a readable MP4 (moov atom not found: truncated, or not a video)"
    if "matches no streams" in text or "does not contain any stream" in text:
        return "no video stream (zero frames, or audio only)"
    if "partial file" in text:
        return "truncated video (" + next(e for e in errors if "partial file" in e) + ")"
    if "Invalid data found" in text:
        return "not a video (ffmpeg: Invalid data found when processing input)"
    return "ffmpeg: " + (errors[0] if errors else "failed without a message")


def check_readable(path: str | Path) -> None:
    """Raise VideoError when the file cannot be opened, before ffmpeg hides why."""
    try:
        with open(path, "rb") as f:
            first = f.read(1)
    except OSError as err:
        raise VideoError(f"unreadable file ({err.strerror or err})") from None
    if not first:
        raise VideoError("empty file (0 bytes)")


def filter_specs(size: int, color_mode: str) -> list[tuple[str, str]]:
    """The (filter, arguments) chain: center-crop to a square, area-resize, convert to rgb24 or gray."""
    if color_mode not in PIX_FMTS:
        raise ValueError(f"color_mode must be one of {sorted(PIX_FMTS)}, got {color_mode!r}")
    # crop centres by default; area averaging avoids aliasing when shrinking large sources.
    return [
        ("crop", r"w=min(iw\,ih):h=min(iw\,ih)"),
        ("scale", f"{size}:{size}:flags=area"),
        ("format", PIX_FMTS[color_mode]),
    ]


def filter_chain(size: int, color_mode: str) -> str:
    """filter_specs as an ffmpeg -vf string."""
    return ",".join(f"{name}={args}" for name, args in filter_specs(size, color_mode))


def decode_args(path: str | Path, size: int, color_mode: str) -> list[str]:
    """The ffmpeg command line that decodes `path` to raw square frames on stdout."""
    # "file:" keeps names with a colon from being read as a protocol; passthrough keeps every
    # decoded frame once (no frame dropping or duplication to a constant rate).
    stream = ffmpeg.input(f"file:{Path(path).resolve()}").output(
        "pipe:", map="0:v:0", vf=filter_chain(size, color_mode), format="rawvideo",
        pix_fmt=PIX_FMTS[color_mode], fps_mode="passthrough",
    )
    return [ffmpeg_exe(), *_GLOBAL_ARGS, *ffmpeg.get_args(stream)]


def decode_ffmpeg(path: str | Path, size: int, color_mode: str = "rgb") -> tuple[np.ndarray, VideoInfo, float]:
    """Decode a whole video: (frames uint8 [N, size, size, C], source info, ffmpeg wall seconds).

    Raises VideoError with a one-line reason for unreadable, non-video, truncated or empty files.
    """
    check_readable(path)
    started = time.perf_counter()
    proc = subprocess.run(decode_args(path, size, color_mode), capture_output=True)
    seconds = time.perf_counter() - started
    log = proc.stderr.decode(errors="replace")
    # A truncated file can still exit 0 with the frames before the damage: treat errors as fatal.
    if proc.returncode != 0 or error_lines(log):
        raise VideoError(explain_failure(log))
    info = parse_stream_info(log)
    if info is None:
        raise VideoError("no video stream found in ffmpeg's log")
    channels = COLOR_CHANNELS[color_mode]
    frame_bytes = size * size * channels
    if len(proc.stdout) == 0:
        raise VideoError("zero frames decoded")
    if len(proc.stdout) % frame_bytes:
        raise VideoError(f"ffmpeg wrote {len(proc.stdout)} bytes, not a whole number of frames")
    frames = np.frombuffer(proc.stdout, np.uint8).reshape(-1, size, size, channels)
    return frames, info, seconds


def probe(path: str | Path) -> VideoInfo:
    """Width, height and fps of a video without ffprobe: parse `ffmpeg -i` (which exits 1 by design)."""
    check_readable(path)
    proc = subprocess.run([ffmpeg_exe(), *_GLOBAL_ARGS, "-i", f"file:{Path(path).resolve()}"],
                          capture_output=True)
    log = proc.stderr.decode(errors="replace")
    info = parse_stream_info(log)
    # `ffmpeg -i` alone always ends with this error; anything else says what is wrong.
    errors = [e for e in error_lines(log) if "output file must be specified" not in e]
    if info is None:
        raise VideoError(explain_failure(log) if errors else "no video stream")
    return info


def clip_span(T: int, frame_stride: int) -> int:
    """Source frames one clip covers: T frames taken every frame_stride-th."""
    return (T - 1) * frame_stride + 1


def clip_starts(n_frames: int, T: int, frame_stride: int = 1, clip_stride: int | None = None) -> list[int]:
    """Start frames of every whole clip; clip_stride defaults to T * frame_stride (no overlap)."""
    if T < 1 or frame_stride < 1 or (clip_stride is not None and clip_stride < 1):
        raise ValueError(f"T, frame_stride, clip_stride must be >= 1, got {T}, {frame_stride}, {clip_stride}")
    step = clip_stride if clip_stride is not None else T * frame_stride
    return list(range(0, n_frames - clip_span(T, frame_stride) + 1, step))


def cut_clips(frames: np.ndarray, starts: list[int], T: int, frame_stride: int = 1) -> np.ndarray:
    """frames [N, H, W, C] -> clips [len(starts), T, H, W, C]; clip i is frames[s_i + k * frame_stride]."""
    index = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(T) * frame_stride
    return frames[index]


def cut_all_clips(frames: np.ndarray, T: int, frame_stride: int, clip_stride: int) -> tuple[list[int], np.ndarray]:
    """Every whole clip of frames [N, H, W, C]: (start frames, clips [n, T, H, W, C]); VideoError if none fits."""
    starts = clip_starts(len(frames), T, frame_stride, clip_stride)
    if not starts:
        raise VideoError(f"too short: {len(frames)} frames, one clip needs {clip_span(T, frame_stride)}")
    return starts, cut_clips(frames, starts, T, frame_stride)


# ---- frames decoded elsewhere (BAIR's raw arrays): the numpy counterparts of the ffmpeg filters

def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W, C] (square) -> [N, size, size, C]: area average down, bicubic up.

    A size that divides H averages exact f x f blocks (rounded half up); other sizes use PIL's box
    filter (area weights, 8-bit fixed point) down and bicubic up.
    """
    n, h, _, c = frames.shape
    if h == size:
        return frames
    if size < h and h % size == 0:
        f = h // size
        blocks = frames.reshape(n, size, f, size, f, c).mean(axis=(2, 4))
        return np.floor(blocks + 0.5).astype(np.uint8)
    resample = Image.Resampling.BOX if size < frames.shape[1] else Image.Resampling.BICUBIC
    resized = [np.asarray(Image.fromarray(f if c == 3 else f[..., 0]).resize((size, size), resample)) for f in frames]
    return np.stack(resized).reshape(n, size, size, c)


def to_gray(frames: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] RGB -> uint8 [..., 1] ITU-R BT.601 luma, rounded to nearest."""
    return np.rint(frames @ LUMA_601).clip(0, 255).astype(np.uint8)[..., None]


def prepare_frames(frames: np.ndarray, size: int, color_mode: str) -> np.ndarray:
    """Square uint8 frames [N, H, H, 3] -> [N, size, size, C] in color_mode."""
    frames = resize_frames(frames, size)
    return to_gray(frames) if color_mode == "gray" else frames
