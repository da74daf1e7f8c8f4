"""What a user chooses for both shard writers (preprocess.shard, preprocess.bair): options, flags, errors."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

from evdm.atomic import DiskFullError
from evdm.ffmpeg import FFmpegNotFound
from evdm.data.schema import COLOR_CHANNELS


class UserError(Exception):
    """Bad input or setup: reported as one line, exit code 2, no traceback."""


@dataclass(frozen=True, kw_only=True)
class ShardOptions:
    """The options every shard writer has; each tool's Options adds its own. Recorded in the manifest."""

    T: int = 8
    frame_stride: int = 1
    clip_stride: int = 8  # resolved: T * frame_stride unless given
    size: int = 64
    color_mode: str = "rgb"
    shard_size: int = 1000
    seed: int = 0


def add_shard_args(parser: argparse.ArgumentParser, *, workers: int) -> None:
    """The flags behind ShardOptions, plus --workers (default `workers`) and --overwrite."""
    parser.add_argument("--size", type=int, default=64, help="square frame side in pixels (default 64)")
    parser.add_argument("--color-mode", choices=tuple(COLOR_CHANNELS), default="rgb")
    parser.add_argument("--T", type=int, default=8, help="frames per clip (default 8)")
    parser.add_argument("--frame-stride", type=int, default=1, help="take every n-th frame (default 1)")
    parser.add_argument("--clip-stride", type=int, default=None,
                        help="frames between clip starts (default T x frame-stride: no overlap)")
    parser.add_argument("--shard-size", type=int, default=1000, help="about this many clips per shard (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shard assignment and shuffles (default 0)")
    parser.add_argument("--workers", type=int, default=workers)
    parser.add_argument("--overwrite", action="store_true", help="replace the shards already in SHARD_DIR")


def shard_options(args: argparse.Namespace) -> dict:
    """ShardOptions' fields from parsed add_shard_args flags, clip_stride resolved."""
    return {"T": args.T, "frame_stride": args.frame_stride, "clip_stride": args.clip_stride or args.T * args.frame_stride,
            "size": args.size, "color_mode": args.color_mode, "shard_size": args.shard_size, "seed": args.seed}


def run_cli(body: Callable[[], int], *, interrupted: str) -> int:
    """body()'s exit code; bad input (UserError, no ffmpeg, OSError) is one line on stderr and exit 2, a full
    disk (evdm.atomic.DiskFullError) one line and exit 1, as the trainer's: not the input's fault, and a rerun
    of the same command resumes once there is space."""
    try:
        return body()
    except DiskFullError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (UserError, FFmpegNotFound, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
