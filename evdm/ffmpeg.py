"""Locating an ffmpeg binary and encoding uint8 frames to MP4. Torch-free."""

import functools
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from evdm.atomic import atomic_write


class FFmpegNotFound(RuntimeError):
    """No ffmpeg binary could be found (the message says how to get one)."""


@functools.cache
def ffmpeg_exe() -> str:
    """Path of ffmpeg: $EVDM_FFMPEG, else a system ffmpeg on PATH, else imageio-ffmpeg's bundled binary."""
    if found := os.environ.get("EVDM_FFMPEG") or shutil.which("ffmpeg"):
        return found
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as err:  # the package raises RuntimeError or ImportError
        raise FFmpegNotFound("no ffmpeg found: install one with `pip install imageio-ffmpeg` (bundled binary) "
                             "or your system's package manager (e.g. `apt-get install ffmpeg`), "
                             "or point EVDM_FFMPEG at a binary") from err


def write_mp4(frames: np.ndarray, path: str | Path, fps: float = 4.0, upscale: int = 1, *, crf: int = 18,
              pix_fmt: str = "yuv420p") -> None:
    """Encode uint8 frames [T, H, W, C] (C = 1 or 3) as H.264 MP4, atomically. `upscale` enlarges (nearest) so
    small frames stay crisp; pix_fmt "yuv444p" and a low `crf` decode closer to the input, "rgb24" at crf 0 exactly."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] not in (1, 3):
        raise ValueError(f"frames must be uint8 [T, H, W, 1|3], got {frames.dtype} {frames.shape}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    _, h, w, _ = frames.shape
    out_h, out_w = h * upscale, w * upscale
    out_h, out_w = out_h + out_h % 2, out_w + out_w % 2  # yuv420p needs even dimensions
    path = Path(path)

    def encode(tmp: Path) -> None:
        cmd = [ffmpeg_exe(), "-y", "-loglevel", "error",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "pipe:",
               "-vf", f"scale={out_w}:{out_h}:flags=neighbor", "-c:v", "libx264" + "rgb" * (pix_fmt == "rgb24"),
               "-pix_fmt", pix_fmt, "-crf", str(crf), "-f", "mp4", str(tmp)]
        proc = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ffmpeg failed writing {path}: {proc.stderr.decode(errors='replace').strip()}")

    atomic_write(path, encode, keep_extension=True)
