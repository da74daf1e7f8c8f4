"""Pictures of clips: frame strips, truth/sample comparisons, batch grids, PNG / GIF / MP4 writers. Numpy on uint8
frames [T, H, W, C] (C = 1 or 3) -> uint8 RGB, each frame enlarged (nearest) and framed: context blue, generated
orange, true middle green. Pixels are copied unchanged (`frame_at` reads them back)."""

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from evdm.atomic import DiskFullError, atomic_write
from evdm.config import Context
from evdm.ffmpeg import FFmpegNotFound, write_mp4

CONTEXT_COLOR = (40, 110, 255)
GENERATED_COLOR = (255, 140, 0)
TRUTH_COLOR = (60, 180, 75)
BACKGROUND = (24, 24, 24)

Cell = tuple[np.ndarray, tuple[int, int, int]]  # (frame [H, W, C] uint8, border colour)

FPS = 4.0  # MP4s and GIFs of clips (8 frames: two seconds)
VIDEO_PX = 256  # MP4s are enlarged (nearest) to about this many pixels across
STRIP_PX = 128  # and PNG strips / grid GIF frames to about this many
_video_failures: set[str] = set()  # kinds of MP4 failure already reported by try_save_video


def strip_scale(size: int) -> int:
    """Nearest-neighbour factor for PNG strips and grid GIFs of size-px frames (16 px -> 8, 64 px -> 2)."""
    return max(1, STRIP_PX // size)


def video_scale(size: int) -> int:
    """Nearest-neighbour factor for MP4s of size-px frames."""
    return max(1, VIDEO_PX // size)


def to_rgb(frames: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 1|3] -> [..., H, W, 3]."""
    if frames.dtype != np.uint8 or frames.shape[-1] not in (1, 3):
        raise ValueError(f"frames must be uint8 [..., H, W, 1|3], got {frames.dtype} {frames.shape}")
    return np.repeat(frames, 3, axis=-1) if frames.shape[-1] == 1 else frames


def cell_origin(row: int, col: int, h: int, w: int, *, scale: int, border: int, gap: int) -> tuple[int, int]:
    """(y, x) of the top-left frame pixel of cell (row, col) in a `grid` picture."""
    return gap + row * (h * scale + 2 * border + gap) + border, gap + col * (w * scale + 2 * border + gap) + border


def grid(cells: list[list[Cell]], *, scale: int = 4, border: int = 2, gap: int = 2) -> np.ndarray:
    """Lay out rows of framed cells (all frames the same [H, W, C]) -> uint8 [GH, GW, 3]."""
    h, w = cells[0][0][0].shape[:2]
    rows, cols = len(cells), max(len(r) for r in cells)
    out_h, out_w = cell_origin(rows, cols, h, w, scale=scale, border=border, gap=gap)
    img = np.full((out_h - border, out_w - border, 3), BACKGROUND, np.uint8)
    for r, row in enumerate(cells):
        for c, (frame, color) in enumerate(row):
            y, x = cell_origin(r, c, h, w, scale=scale, border=border, gap=gap)
            img[y - border : y + h * scale + border, x - border : x + w * scale + border] = color
            img[y : y + h * scale, x : x + w * scale] = to_rgb(frame).repeat(scale, axis=0).repeat(scale, axis=1)
    return img


def frame_colors(T: int, context: Context, middle: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Frame border colours: context blue for the first context.start and last context.end frames."""
    return [CONTEXT_COLOR if t < context.start or t >= T - context.end else middle for t in range(T)]


def frame_strip(clip: np.ndarray, context: Context, *, scale: int = 4, middle_color=GENERATED_COLOR) -> np.ndarray:
    """One row of all T frames of clip [T, H, W, C]; context frames framed blue, the middle orange."""
    return grid([list(zip(clip, frame_colors(len(clip), context, middle_color)))], scale=scale)


def comparison_strip(truth: np.ndarray, sample: np.ndarray, context: Context, *, scale: int = 4) -> np.ndarray:
    """Two rows: the ground-truth clip (middle framed green) above the sample (middle orange)."""
    if truth.shape != sample.shape:
        raise ValueError(f"truth {truth.shape} and sample {sample.shape} differ in shape")
    return grid([list(zip(clip, frame_colors(len(clip), context, color)))
                 for clip, color in ((truth, TRUTH_COLOR), (sample, GENERATED_COLOR))], scale=scale)


def batch_grid_frames(clips: np.ndarray, context: Context, *, cols: int | None = None, scale: int = 2) -> np.ndarray:
    """Grid video frames of a batch: clips [B, T, H, W, C] -> uint8 [T, GH, GW, 3], cell b showing clip b's frame t."""
    B, T = clips.shape[:2]
    cols = cols or int(np.ceil(np.sqrt(B)))
    frames = []
    for t, color in enumerate(frame_colors(T, context, GENERATED_COLOR)):
        cells = [(clips[b, t], color) for b in range(B)]
        frames.append(grid([cells[i : i + cols] for i in range(0, B, cols)], scale=scale))
    return np.stack(frames)


def save_png(img: np.ndarray, path: str | Path) -> None:
    """Write uint8 [H, W, 1|3] losslessly as PNG."""
    atomic_write(Path(path), lambda p: Image.fromarray(to_rgb(img)).save(p, format="PNG"), keep_extension=True)


def save_gif(frames: np.ndarray, path: str | Path, fps: float = 4.0) -> None:
    """Write uint8 [T, H, W, 1|3] as a looping animated GIF (palette per frame)."""
    images = [Image.fromarray(f) for f in to_rgb(frames)]
    atomic_write(Path(path), lambda p: images[0].save(p, format="GIF", save_all=True, append_images=images[1:],
                                                      duration=int(round(1000 / fps)), loop=0), keep_extension=True)


def save_video(frames: np.ndarray, path: str | Path, *, fps: float = 4.0, scale: int = 8) -> None:
    """MP4 of uint8 [T, H, W, 1|3] via ffmpeg, enlarged `scale` times (lossy: inspect PNGs for exact pixels)."""
    write_mp4(frames, path, fps=fps, upscale=scale)


def try_save_video(frames: np.ndarray, path: str | Path, *, fps: float = 4.0, scale: int = 8) -> bool:
    """`save_video`, but a missing or failing ffmpeg costs only the MP4: one warning per kind of
    failure and process, then False. PNG outputs carry the exact pixels, so nothing else depends on it."""
    try:
        save_video(frames, path, fps=fps, scale=scale)
        return True
    except DiskFullError:
        raise  # not ffmpeg's problem: every later write would fail too
    except (FFmpegNotFound, RuntimeError, OSError) as err:
        kind = type(err).__name__
        if kind not in _video_failures:
            _video_failures.add(kind)
            first = str(err).strip().splitlines()[0] if str(err).strip() else kind
            warnings.warn(f"skipping MP4 outputs ({first}); PNG strips are still written", stacklevel=2)
        return False
