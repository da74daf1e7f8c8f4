"""The built-in BAIR-like dataset: `python -m preprocess.synth OUT_DIR [--videos N --motion KIND ...]`.

A tabletop seen from above with a few textured objects and an arm-like shape, so that a small model
can learn to fill in the middle frames on a CPU. Two kinds of object motion (`--motion`):
- "glide" (default): smooth, mostly rigid translation along straight lines, eased in and out;
- "orbit": objects circle around their own centres with angular acceleration, so they speed up,
  turn, and pass over and behind one another (drawn in depth order): the middle of a clip is not a
  straight line between its ends, and what the ends hide can reappear in between.
Rendered with vectorised numpy, encoded with ffmpeg (H.264, crf 10, yuv444p) so decoded frames stay
close to the rendered ones. Writes OUT_DIR/videos_train/*.mp4 and OUT_DIR/videos_val/*.mp4.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from evdm.ffmpeg import FFmpegNotFound, ffmpeg_exe, write_mp4

SPLIT_DIRS = {"train": "videos_train", "val": "videos_val"}
MOTIONS = ("glide", "orbit")
SYNTH_FPS = 10.0  # BAIR's frame rate
SYNTH_CRF = 10


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _coverage(signed_dist: np.ndarray, px: float) -> np.ndarray:
    """Soft (about one-pixel) anti-aliased mask from a signed distance in frame units."""
    return np.clip(0.5 - signed_dist / px, 0.0, 1.0)


def _progress(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """A smooth 0 -> 1 motion profile over t in [0, 1] with a random start, duration (speed)."""
    start = rng.uniform(0.0, 0.4)
    duration = rng.uniform(0.4, 1.2)  # > remaining time means the move is still going at the end
    return _smoothstep((t - start) / duration)


def _table(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Static textured tabletop [H, W, 3] in [0, 1]: a base colour plus low-frequency grain."""
    base = rng.uniform(0.35, 0.7, size=3)
    grain = np.zeros_like(xs)
    for _ in range(3):
        freq = rng.uniform(2.0, 7.0)
        angle = rng.uniform(0, np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        grain += np.sin(2 * np.pi * freq * (xs * np.cos(angle) + ys * np.sin(angle)) + phase)
    return np.clip(base[None, None, :] * (1.0 + 0.06 * grain[..., None]), 0.0, 1.0)


def _composite(canvas: np.ndarray, alpha: np.ndarray, color: np.ndarray) -> None:
    """In place: canvas [T, H, W, 3] = alpha * color + (1 - alpha) * canvas, alpha [T, H, W]."""
    a = alpha[..., None]
    canvas *= 1.0 - a
    canvas += a * color


def _glide(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """Object centre [2, T, 1, 1]: a straight move from a random start, eased (a quarter stay put)."""
    start = rng.uniform(0.15, 0.85, size=2)
    shift = rng.normal(0.0, 0.18, size=2) * (rng.random() < 0.75)
    return start[:, None, None, None] + shift[:, None, None, None] * _progress(rng, t)


def _orbit(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """Object centre [2, T, 1, 1] on a circle (an ellipse's worth of radii) around a random pivot, with
    angle theta0 + w t + a t^2: it turns through up to ~1.5 turns a clip and speeds up or slows down."""
    pivot = rng.uniform(0.3, 0.7, size=2)
    radii = rng.uniform(0.1, 0.3, size=2)
    theta = rng.uniform(0, 2 * np.pi) + rng.uniform(-5.0, 5.0) * t + rng.uniform(-4.0, 4.0) * t**2
    return np.stack([pivot[0] + radii[0] * np.sin(theta), pivot[1] + radii[1] * np.cos(theta)])


def _draw_objects(canvas: np.ndarray, rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, t: np.ndarray,
                  px: float, path: Callable[[np.random.Generator, np.ndarray], np.ndarray]) -> None:
    """In place: 2-4 textured discs and boxes, moved rigidly along path(rng, t); the first drawn is the lowest."""
    for _ in range(rng.integers(2, 5)):
        radius = rng.uniform(0.08, 0.15)
        cy, cx = path(rng, t)
        dy, dx = ys - cy, xs - cx  # [T, H, W], object-local coordinates
        if rng.random() < 0.5:
            dist = np.hypot(dy, dx) - radius
        else:
            dist = np.maximum(np.abs(dy), np.abs(dx)) - radius * 0.85
        color = rng.uniform(0.1, 0.95, size=3)
        # Stripes in object coordinates, so the texture moves with the object.
        freq = rng.uniform(12.0, 24.0)
        angle = rng.uniform(0, np.pi)
        stripes = np.sin(2 * np.pi * freq * (dx * np.cos(angle) + dy * np.sin(angle)))
        shade = (0.8 + 0.2 * stripes)[..., None] * color
        alpha = _coverage(dist, px)[..., None]
        # A soft shadow offset down-right gives depth without changing the motion.
        shadow = _coverage(np.hypot(dy - 0.02, dx - 0.02) - radius, 3 * px) * 0.35
        _composite(canvas, shadow, np.zeros(3))
        canvas *= 1.0 - alpha
        canvas += alpha * shade


def _draw_arm(canvas: np.ndarray, rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, t: np.ndarray,
              px: float) -> None:
    """In place: the arm, a capsule from a base outside the frame to a gripper tip sweeping a smooth curve."""
    edge = rng.integers(4)
    along = rng.uniform(0.2, 0.8)
    base = [(-0.3, along), (1.3, along), (along, -0.3), (along, 1.3)][edge]
    base = np.array(base)
    tip0 = rng.uniform(0.25, 0.75, size=2)
    tip1 = np.clip(tip0 + rng.normal(0.0, 0.25, size=2), 0.1, 0.9)
    bend = rng.normal(0.0, 0.12, size=2)
    s = _progress(rng, t)
    # Quadratic Bezier from tip0 to tip1 bent by `bend`: smooth, varied-speed sweeps.
    ctrl = (tip0 + tip1) / 2 + bend
    tip = ((1 - s) ** 2)[None] * tip0[:, None, None, None] + (2 * (1 - s) * s)[None] * ctrl[:, None, None, None] \
        + (s**2)[None] * tip1[:, None, None, None]  # [2, T, 1, 1]
    seg = tip - base[:, None, None, None]
    seg_len2 = np.maximum((seg**2).sum(0), 1e-9)
    rel = np.stack([ys, xs])[:, None] - base[:, None, None, None]  # [2, 1, H, W]
    u = np.clip((rel * seg).sum(0) / seg_len2, 0.0, 1.0)  # projection onto the arm segment
    arm_dist = np.hypot(rel[0] - u * seg[0], rel[1] - u * seg[1]) - 0.045
    arm_color = np.array([0.55, 0.57, 0.6]) * rng.uniform(0.8, 1.2)
    _composite(canvas, _coverage(np.hypot(ys - tip[0] - 0.025, xs - tip[1] - 0.025) - 0.05, 3 * px) * 0.3, np.zeros(3))
    _composite(canvas, _coverage(arm_dist, px), np.clip(arm_color, 0, 1))
    gripper = np.maximum(np.abs(ys - tip[0]), np.abs(xs - tip[1])) - 0.06
    _composite(canvas, _coverage(gripper, px), np.array([0.15, 0.15, 0.18]))


def render_video(seed: int | tuple[int, ...], frames: int = 30, size: int = 64, motion: str = "glide") -> np.ndarray:
    """Render one synthetic clip: uint8 [frames, size, size, 3]; a pure function of its arguments."""
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
    rng = np.random.default_rng(seed)
    px = 1.0 / size  # one pixel in frame units
    coords = (np.arange(size) + 0.5) / size
    ys, xs = np.meshgrid(coords, coords, indexing="ij")  # [H, W] in (0, 1)
    t = np.linspace(0.0, 1.0, frames)[:, None, None]  # [T, 1, 1]

    canvas = np.broadcast_to(_table(rng, ys, xs), (frames, size, size, 3)).copy()
    _draw_objects(canvas, rng, ys, xs, t, px, _glide if motion == "glide" else _orbit)
    _draw_arm(canvas, rng, ys, xs, t, px)  # last, so it occludes the objects it passes over
    return np.round(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)


def video_seed(seed: int, split: str, index: int) -> tuple[int, int, int]:
    """Per-video seed: video i of a split is the same whatever the number of videos asked for."""
    return (seed, list(SPLIT_DIRS).index(split), index)


def generate(
    out_dir: str | Path,
    *,
    videos: int = 600,
    val_fraction: float = 0.1,
    frames: int = 30,
    size: int = 64,
    seed: int = 0,
    workers: int = 2,
    motion: str = "glide",
) -> dict[str, list[Path]]:
    """Write the dataset; returns {split: [paths]}. Val gets round(videos * val_fraction) of them."""
    if videos < 1 or frames < 1 or size < 2:
        raise ValueError(f"need videos >= 1, frames >= 1, size >= 2; got {videos}, {frames}, {size}")
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
    n_val = round(videos * val_fraction) if videos > 1 else 0
    counts = {"train": videos - n_val, "val": n_val}
    jobs = []
    for split, n in counts.items():
        folder = Path(out_dir) / SPLIT_DIRS[split]
        folder.mkdir(parents=True, exist_ok=True)
        jobs += [(split, i, folder / f"{split}_{i:05d}.mp4") for i in range(n)]

    def make(job: tuple[str, int, Path]) -> Path:
        split, i, path = job
        frames_u8 = render_video(video_seed(seed, split, i), frames, size, motion)
        write_mp4(frames_u8, path, fps=SYNTH_FPS, crf=SYNTH_CRF, pix_fmt="yuv444p")
        return path

    # Threads suffice: numpy and the ffmpeg subprocess both release the GIL.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        paths = list(pool.map(make, jobs))
    return {split: [p for (s, _, _), p in zip(jobs, paths) if s == split] for split in counts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preprocess.synth", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--videos", type=int, default=600, help="total number of videos (default 600)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of them in videos_val")
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--motion", choices=MOTIONS, default="glide",
                        help="glide: eased straight moves; orbit: accelerating turns, objects passing behind others")
    args = parser.parse_args(argv)
    try:
        ffmpeg_exe()
        written = generate(args.out_dir, videos=args.videos, val_fraction=args.val_fraction,
                           frames=args.frames, size=args.size, seed=args.seed, workers=args.workers,
                           motion=args.motion)
    except (FFmpegNotFound, ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written['train'])} train and {len(written['val'])} val videos to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
