"""Decode one video to square uint8 frames and cut it into clips. Torch-free.

Decoding runs ffmpeg (via ffmpeg-python) as one subprocess writing raw frames to a pipe. Resampling
to a frame rate, cropping and resizing happen inside ffmpeg's filter graph (`filter_specs`), which
preprocess.decode_av reuses so both backends give the same pixels. Rotation metadata is applied by
the ffmpeg command line's own autorotate (its default), which preprocess.decode_av mirrors with the
same filters (`orient_filters`). ffprobe is not assumed (imageio-ffmpeg ships none): the stream's
size, fps, sample aspect ratio and rotation are read from ffmpeg's own log, printed with a level tag
on every line so that errors can be told apart from information reliably. Frames that arrive
decoded (BAIR's raw arrays) are resized and converted in numpy instead (`prepare_frames`).
"""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import ffmpeg
import numpy as np
from PIL import Image

from evdm.ffmpeg import ffmpeg_exe
from evdm.data.schema import COLOR_CHANNELS

PIX_FMTS = {"rgb": "rgb24", "gray": "gray"}
# level+info: every log line carries "[info]", "[error]", ... so errors are found by tag, not wording.
_GLOBAL_ARGS = ["-hide_banner", "-nostdin", "-loglevel", "level+info"]
_STREAM_RE = re.compile(r"Stream #\d+:\d+.*?: Video: (?P<rest>.*)")
_SIZE_RE = re.compile(r"(?:^|[ ,])(?P<w>\d{1,5})x(?P<h>\d{1,5})(?:[ ,\[]|$)")
_FPS_RE = re.compile(r"(?P<v>\d+(?:\.\d+)?)(?P<k>k?) (?:fps|tbr)")
_SAR_RE = re.compile(r"\[SAR (?P<n>\d+):(?P<d>\d+) DAR")
# "Display Matrix: rotation of 90.00 degrees" (older versions: "displaymatrix: rotation of ...")
_ROTATION_RE = re.compile(r"(?i)display ?matrix: rotation of (?P<deg>-?\d+(?:\.\d+)?) degrees")
LUMA_601 = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma weights
_TAG_RE = re.compile(r"^(?:\[[^\]]*@ 0x[0-9a-f]+\] )*\[(?P<level>error|fatal|panic)\] (?P<msg>.*)$")


class VideoError(Exception):
    """A video that cannot be used; str() is the one-line reason for the summary and manifest."""


@dataclass(frozen=True)
class VideoInfo:
    width: int  # as stored, before rotation
    height: int
    fps: float | None  # the source's rate; None when the container states none
    sar: str = "1:1"  # sample (pixel) aspect ratio, "W:H"
    rotation: int = 0  # the display matrix's rotation, counter-clockwise degrees in [0, 360)


def parse_stream_info(log: str) -> VideoInfo | None:
    """The first input video stream's size, fps, SAR and rotation from ffmpeg's `-i` log, or None if it has none."""
    # Only the input section: the output section repeats "Video:" with the converted size.
    log = re.split(r"^(?:\[info\] )?(?:Stream mapping:|Output #0)", log, maxsplit=1, flags=re.M)[0]
    lines = log.splitlines()
    for i, line in enumerate(lines):
        match = _STREAM_RE.search(line)
        if not match:
            continue
        rest = match["rest"]
        size = _SIZE_RE.search(rest)
        if not size:
            continue
        fps = _FPS_RE.search(rest)
        rate = float(fps["v"]) * (1000 if fps["k"] else 1) if fps else None
        sar = _SAR_RE.search(rest)
        # The stream's side data follows its line, up to the next stream.
        after = "\n".join(itertools.takewhile(lambda text: "Stream #" not in text, lines[i + 1:]))
        rotation = _ROTATION_RE.search(after)
        return VideoInfo(int(size["w"]), int(size["h"]), rate, sar=sar_text(sar["n"], sar["d"]) if sar else "1:1",
                         rotation=round(float(rotation["deg"])) % 360 if rotation else 0)
    return None


def logged_rate(fps: float) -> float:
    """A frame rate at the precision ffmpeg's log prints it (libavformat's print_fps), so that the rate
    PyAV reads equals the one parsed from the command line's log: 30000/1001 -> 29.97."""
    hundredths = round(fps * 100)
    if hundredths == 0:
        return round(fps, 4)
    return hundredths / 100 if hundredths % 100 else float(round(fps))


def sar_text(num: int | str, den: int | str) -> str:
    """A sample aspect ratio as reduced "W:H"; "1:1" when unknown (0 or missing), as ffmpeg's filters assume."""
    num, den = int(num), int(den)
    if num <= 0 or den <= 0:
        return "1:1"
    ratio = Fraction(num, den)
    return f"{ratio.numerator}:{ratio.denominator}"


def error_lines(log: str) -> list[str]:
    """Messages of the lines ffmpeg logged at error level or worse, without their [tags]."""
    return [m["msg"].strip() for m in map(_TAG_RE.match, log.splitlines()) if m]


def explain_failure(log: str) -> str:
    """A one-line reason for a failed or damaged decode, from ffmpeg's log."""
    errors = error_lines(log)
    text = "\n".join(errors)
    if "moov atom not found" in text:
        return "not a readable MP4/MOV (moov atom not found: truncated, or not a video)"
    if "matches no streams" in text or "does not contain any stream" in text:
        return "no video stream (zero frames, or audio only)"
    if "partial file" in text:
        return "truncated video (" + next(e for e in errors if "partial file" in e) + ")"
    if "Error submitting packet to decoder" in text or "Decoding error" in text:
        # The container opened but its frames do not decode: a damaged stream, not a non-video.
        return "damaged video stream (ffmpeg: " + next(e for e in errors if "decod" in e.lower()) + ")"
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


def rate_arg(fps: float) -> str:
    """A frame rate as the exact fraction ffmpeg should use: 25 -> "25/1", 29.97002997 -> "30000/1001"."""
    rate = Fraction(fps).limit_denominator(100_000)
    return f"{rate.numerator}/{rate.denominator}"


def filter_specs(size: int, color_mode: str, fps: float | None = None) -> list[tuple[str, str]]:
    """The (filter, arguments) chain: resample to `fps` (None: keep every frame), center-crop to a
    square of the displayed picture, area-resize, convert to rgb24 or gray."""
    if color_mode not in PIX_FMTS:
        raise ValueError(f"color_mode must be one of {sorted(PIX_FMTS)}, got {color_mode!r}")
    # setpts anchors the resampling grid at the first frame: the ffmpeg command line shifts
    # timestamps by the file's start time and PyAV does not, and the fps filter rounds on that grid.
    resample = [("setpts", "PTS-STARTPTS"), ("fps", rate_arg(fps))] if fps else []
    # The crop is square on screen: a pixel is `sar` times as wide as it is high, so the crop is
    # ih/sar stored pixels wide when the picture is wide; the scale then makes the pixels square.
    # Area averaging avoids aliasing when shrinking large sources.
    return resample + [
        ("crop", r"w=min(iw\,ih/sar):h=min(ih\,iw*sar)"),
        ("scale", f"{size}:{size}:flags=area"),
        ("format", PIX_FMTS[color_mode]),
    ]


def filter_chain(size: int, color_mode: str, fps: float | None = None) -> str:
    """filter_specs as an ffmpeg -vf string."""
    return ",".join(f"{name}={args}" for name, args in filter_specs(size, color_mode, fps))


def display_rotation(matrix: list[int]) -> float:
    """av_display_rotation_get: the counter-clockwise degrees a 3x3 display matrix (16.16 fixed point) turns."""
    m = [v / 65536.0 for v in matrix]
    scale0, scale1 = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    if scale0 == 0.0 or scale1 == 0.0:
        return math.nan
    return -math.degrees(math.atan2(m[1] / scale1, m[0] / scale0))


def rotation_degrees(matrix: list[int] | None) -> int:
    """The display matrix's rotation as ffmpeg's log states it, rounded, in [0, 360); 0 without a matrix."""
    rotation = math.nan if matrix is None else display_rotation(matrix)
    return 0 if math.isnan(rotation) else round(rotation) % 360


def orient_filters(matrix: list[int] | None) -> list[tuple[str, str | None]]:
    """The filters the ffmpeg command line's autorotate inserts for a display matrix (fftools get_rotation
    and configure_input_video_filter), so PyAV turns frames upright exactly as the command line does."""
    if matrix is None:
        return []
    rotation = display_rotation(matrix)
    theta = 0.0 if math.isnan(rotation) else -round(rotation)
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1.0:
        return [("transpose", "cclock_flip" if matrix[3] > 0 else "clock")]
    if abs(theta - 180) < 1.0:
        return [(name, None) for name, flip in (("hflip", matrix[0] < 0), ("vflip", matrix[4] < 0)) if flip]
    if abs(theta - 270) < 1.0:
        return [("transpose", "clock_flip" if matrix[3] < 0 else "cclock")]
    if abs(theta) > 1.0:
        return [("rotate", f"{theta:f}*PI/180")]
    return [("vflip", None)] if matrix[4] < 0 else []


def decode_args(path: str | Path, size: int, color_mode: str, fps: float | None = None) -> list[str]:
    """The ffmpeg command line that decodes `path` to raw square frames on stdout."""
    # "file:" keeps names with a colon from being read as a protocol; passthrough keeps every frame
    # the filters give once (the fps filter, when asked for, is what sets the rate). Autorotate is
    # the command line's default: it turns frames upright before this chain.
    stream = ffmpeg.input(f"file:{Path(path).resolve()}").output(
        "pipe:", map="0:v:0", vf=filter_chain(size, color_mode, fps), format="rawvideo",
        pix_fmt=PIX_FMTS[color_mode], fps_mode="passthrough",
    )
    return [ffmpeg_exe(), *_GLOBAL_ARGS, *ffmpeg.get_args(stream)]


def decode_ffmpeg(path: str | Path, size: int, color_mode: str = "rgb",
                  fps: float | None = None) -> tuple[np.ndarray, VideoInfo, float]:
    """Decode a whole video: (frames uint8 [N, size, size, C], source info, ffmpeg wall seconds).

    Frames are upright (rotation metadata applied), resampled to `fps` when given, center-cropped
    square on screen (non-square pixels corrected). Raises VideoError with a one-line reason for
    unreadable, non-video, truncated or empty files.
    """
    check_readable(path)
    started = time.perf_counter()
    proc = subprocess.run(decode_args(path, size, color_mode, fps), capture_output=True)
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


def probe_rates(paths: list[Path]) -> list[float | None]:
    """Each file's frame rate as decode_ffmpeg reports it, from the headers, by one `ffmpeg -i A -i B ...` for all
    of them: starting a process per file would cost ten times the reading. None for a file without a video
    stream or that ffmpeg cannot open (it stops there; the next call goes on after it)."""
    rates: list[float | None] = []
    while len(rates) < len(paths):
        args = [a for path in paths[len(rates):] for a in ("-i", f"file:{Path(path).resolve()}")]
        log = subprocess.run([ffmpeg_exe(), *_GLOBAL_ARGS, *args], capture_output=True).stderr.decode(errors="replace")
        opened = re.split(r"^(?:\[info\] )?Input #\d+, ", log, flags=re.M)[1:]
        rates += [info.fps if (info := parse_stream_info(text)) else None for text in opened]
        if len(rates) < len(paths) and len(opened) < len(args) // 2:
            rates.append(None)  # the file ffmpeg could not open
    return rates


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


def spread(n: int, k: int | None) -> list[int]:
    """k of the indices 0..n-1 spread evenly (the middle of each of k equal parts); all when k is None or >= n."""
    if k is None or k >= n:
        return list(range(n))
    return [(2 * i + 1) * n // (2 * k) for i in range(k)]


def frame_changes(frames: np.ndarray) -> np.ndarray:
    """float [N - 1]: the mean absolute change (0-1) from each frame of uint8 [N, H, W, C] to the next (pair by
    pair: no widened copy of a long video)."""
    return np.array([np.abs(b.astype(np.int16) - a).mean() / 255.0 for a, b in zip(frames[:-1], frames[1:])])


def cut_all_clips(frames: np.ndarray, T: int, frame_stride: int, clip_stride: int,
                  max_clips: int | None = None, scene_cut: float | None = None) -> tuple[list[int], np.ndarray]:
    """The whole clips of frames [N, H, W, C], at most max_clips spread evenly over the video:
    (start frames, clips [n, T, H, W, C]); VideoError if none fits. With `scene_cut`, a clip in which two
    consecutive source frames change by more than it (frame_changes) spans a scene cut and is left out: its
    middle cannot be interpolated from its ends, and the few such clips would dominate an interpolation loss."""
    starts = clip_starts(len(frames), T, frame_stride, clip_stride)
    if not starts:
        raise VideoError(f"too short: {len(frames)} frames, one clip needs {clip_span(T, frame_stride)}")
    if scene_cut is not None:
        cuts = np.concatenate([[0], np.cumsum(frame_changes(frames) > scene_cut)])  # cuts before each frame
        span = clip_span(T, frame_stride) - 1
        starts = [s for s in starts if cuts[s + span] == cuts[s]]
        if not starts:
            raise VideoError(f"every clip spans a scene cut (a change of more than {scene_cut:g} between frames)")
    starts = [starts[i] for i in spread(len(starts), max_clips)]
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
