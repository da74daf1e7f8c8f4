"""`python -m preprocess.shard DATA_DIR SHARD_DIR [options]`: folders of videos -> WebDataset tar shards.

The scan (preprocess.select) fixes the videos and each one's split; preprocess.plan deals the
videos of a split into fixed groups, one group per shard, and makes the run resumable (a rerun with
the same options and inputs keeps every finished shard). A shard's videos are decoded in parallel
(a process pool, one task per video: decoded upright, resampled to --fps when asked, cut into
clips), and its clips shuffled with a seed of their own and written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from evdm.ffmpeg import FFmpegNotFound, ffmpeg_exe
from evdm.data.schema import clip_shape, encode_sample, make_key
from evdm.lock import lock_folder
from preprocess.inspect import geometry_lines, rate_line, scan_lines
from preprocess.options import ShardOptions, UserError, add_shard_args, run_cli, shard_options
from preprocess.plan import (ShardPlan, finish, inputs_digest, plan_shards, record_shard, resume_plans,
                             worker_map, write_planned_shard)
from preprocess.progress import Progress
from preprocess.rates import MAX_UPSAMPLING, check_upsampling, source_rates
from preprocess.select import (SPLIT_NAMES, VIDEO_EXTENSIONS, Selection, lists_digest, normalize_extensions,
                               read_split_list, select_videos)
from preprocess.state import open_state
from preprocess.video import VideoError, VideoInfo, cut_all_clips, decode_ffmpeg
from preprocess.writer import SPLITS

# The options evdm.legacy.PREPROCESS_OPTIONS_ADDED lists, at the values that do what the versions before
# them did: such a folder still resumes (the inputs fingerprint covers which videos the extensions pick).
ADDED_OPTIONS = {"fps": None, "extensions": VIDEO_EXTENSIONS, "split_lists": (), "split_column": "path",
                 "max_clips_per_video": None, "max_videos": None, "scene_cut": None}
CALIBRATION_VIDEOS = 8  # decoded up front to estimate clips per video (hence videos per shard)


@dataclass(frozen=True, kw_only=True)
class Options(ShardOptions):
    """Everything that decides the shards' bytes; recorded in the manifest and checked on resume."""

    val_fraction: float = 0.05
    decoder: str = "ffmpeg"
    fps: float | None = None  # resample every video to this rate before cutting clips; None keeps each one's own
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS
    split_lists: tuple[tuple[str, str], ...] = ()  # (split, list file) pairs; the lists then decide the splits
    split_column: str = "path"  # the column of a CSV split list that names the videos
    max_clips_per_video: int | None = None  # spread evenly over the video
    max_videos: int | None = None
    scene_cut: float | None = None  # leave out clips whose frames change by more than this (0-1) from one to the next


@dataclass
class VideoResult:
    path: str
    clips: np.ndarray | None  # uint8 [n, T, H, W, C]
    starts: list[int] = field(default_factory=list)
    info: VideoInfo | None = None  # the source's size, rate, SAR, rotation
    frames: int = 0  # decoded frames (after resampling)
    reason: str | None = None  # why the video was skipped
    decode_s: float = 0.0  # decoder wall time (the ffmpeg subprocess, or PyAV)
    task_s: float = 0.0  # whole task in the worker


@dataclass
class Summary:
    manifest: Manifest | None
    videos: int = 0
    clips: int = 0
    bytes_written: int = 0
    reused_shards: int = 0
    processed: int = 0  # videos decoded in this run (the rest sat in reused shards)
    wall_s: float = 0.0
    decode_s: float = 0.0
    task_s: float = 0.0
    write_s: float = 0.0
    skipped: list[dict] = field(default_factory=list)
    selection: Selection | None = None


def plan_videos(selection: Selection, opts: Options, videos_per_shard: int) -> list[ShardPlan]:
    """Each split's videos dealt, in a seeded random order, into shards of videos_per_shard."""
    by_split = {split: [v for v, s in selection.splits.items() if s == split] for split in SPLITS}
    return plan_shards(by_split, opts.seed, videos_per_shard)


# ---- per-video work (runs in the pool)

def _decoder(name: str):
    if name == "pyav":
        from preprocess.decode_av import decode_pyav

        return decode_pyav
    return decode_ffmpeg


def process_video(data_dir: Path, relpath: str, opts: Options) -> VideoResult:
    """Decode one video and cut its clips; bad videos come back with a reason, never an exception."""
    started = time.perf_counter()
    result = VideoResult(relpath, None)
    try:
        frames, result.info, result.decode_s = _decoder(opts.decoder)(data_dir / relpath, opts.size, opts.color_mode,
                                                                     opts.fps)
        result.frames = len(frames)
        result.starts, result.clips = cut_all_clips(frames, opts.T, opts.frame_stride, opts.clip_stride,
                                                    opts.max_clips_per_video, opts.scene_cut)
    except VideoError as err:
        result.reason = str(err)
    result.task_s = time.perf_counter() - started
    return result


def _process_task(args: tuple[Path, str, Options]) -> VideoResult:
    return process_video(*args)


def calibrate(data_dir: Path, videos: list[str], opts: Options) -> int:
    """Videos per shard so a shard holds about shard_size clips, from the first few usable videos."""
    counts = []
    for rel in videos[:CALIBRATION_VIDEOS]:
        result = process_video(data_dir, rel, opts)
        if result.clips is not None:
            counts.append(len(result.clips))
        if len(counts) == 4:
            break
    per_video = float(np.mean(counts)) if counts else 1.0
    return max(1, round(opts.shard_size / per_video))


# ---- writing one shard

def encode_clip(r: VideoResult, i: int, split: str, opts: Options) -> dict:
    """Clip i of a decoded video as one shard sample; start_frame and fps are those of the (resampled) frames."""
    meta = {"source": r.path, "start_frame": r.starts[i], "frame_stride": opts.frame_stride,
            "fps": opts.fps or r.info.fps, "split": split}
    if opts.fps:
        meta["source_fps"] = r.info.fps
    return encode_sample(make_key(r.path, r.starts[i]), r.clips[i], meta)


def source_entry(r: VideoResult, split: str) -> dict:
    """What the manifest records of one usable video: where it went and what the source was."""
    return {"path": r.path, "split": split, "fps": r.info.fps, "width": r.info.width, "height": r.info.height,
            "sar": r.info.sar, "rotation": r.info.rotation, "frames": r.frames, "clips": len(r.clips)}


def write_video_shard(shard_dir: Path, plan: ShardPlan, results: list[VideoResult], opts: Options) -> dict:
    """Write the shard of these decoded videos (none when no clip came out); return its progress record."""
    items = [(r, i) for r in results if r.clips is not None for i in range(len(r.clips))]
    return write_planned_shard(shard_dir, plan, opts.seed, items, lambda item: encode_clip(*item, plan.split, opts),
                               videos=sum(r.clips is not None for r in results),
                               skipped=[{"path": r.path, "reason": r.reason} for r in results if r.clips is None],
                               sources=[source_entry(r, plan.split) for r in results if r.clips is not None])


# ---- the run

def check_ffmpeg() -> None:
    """Fail early, with how to get one, when no runnable ffmpeg exists."""
    exe = ffmpeg_exe()
    try:
        subprocess.run([exe, "-version"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise FFmpegNotFound(f"ffmpeg at {exe} does not run ({err}); install one with "
                             "`pip install imageio-ffmpeg` or `apt-get install ffmpeg`, "
                             "or point EVDM_FFMPEG at a binary") from None


def find_videos(data_dir: Path, opts: Options) -> tuple[Selection, dict, dict[str, str]]:
    """The videos to shard, the run's identity (options, inputs, lists) and {split list file: digest}, after
    checking DATA_DIR, the split lists and the decoder: UserError or FFmpegNotFound before any decoding."""
    if not data_dir.is_dir():
        raise UserError(f"DATA_DIR {data_dir} does not exist or is not a folder")
    lists: dict[str, list[str]] = {}
    files: dict[str, list[str]] = {}  # split -> its lists, as given, for messages
    digests: dict[str, str] = {}
    for split, path in opts.split_lists:
        names = read_split_list(Path(path), opts.split_column)
        lists.setdefault(SPLIT_NAMES[split], []).extend(names)
        files.setdefault(SPLIT_NAMES[split], []).append(f"{split}={path}")
        digests[path] = lists_digest({split: names})
    selection = select_videos(data_dir, extensions=opts.extensions, lists=lists or None,
                              val_fraction=opts.val_fraction, max_videos=opts.max_videos, seed=opts.seed,
                              list_files={split: ", ".join(given) for split, given in files.items()})
    if opts.decoder == "ffmpeg":
        check_ffmpeg()
    identity = {"options": asdict(opts), "inputs": inputs_digest(data_dir, selection.videos)}
    if lists:
        identity["split_lists"] = lists_digest(lists)
    # Through JSON, as progress.json stores it: tuples become lists, so a rerun compares equal.
    return selection, json.loads(json.dumps(identity)), digests


def run(data_dir: Path, shard_dir: Path, opts: Options, *, workers: int = 1, overwrite: bool = False,
        show_progress: bool = False, allow_upsampling: bool = False) -> Summary:
    """Shard data_dir into shard_dir, showing progress if asked. Raises UserError on bad input.

    shard_dir is locked first (evdm.lock): a second run on it, whatever its options, is refused before it
    scans or records anything. With --fps, every video's rate is known before the first decode:
    probed from its header (preprocess.rates), so an up-sampling refusal writes no shard and decodes no video."""
    with lock_folder(shard_dir, "SHARD_DIR", UserError):
        return _run(data_dir, shard_dir, opts, workers, overwrite, show_progress, allow_upsampling)


def _run(data_dir: Path, shard_dir: Path, opts: Options, workers: int, overwrite: bool, show_progress: bool,
         allow_upsampling: bool) -> Summary:
    started = time.perf_counter()
    selection, identity, list_digests = find_videos(data_dir, opts)
    videos = selection.videos
    state = open_state(shard_dir, identity, overwrite=overwrite, added=ADDED_OPTIONS, list_digests=list_digests)
    if opts.fps:
        check_upsampling(source_rates(data_dir, videos, state, opts.decoder, workers, show_progress), opts.fps,
                         allow_upsampling)
    if not state["videos_per_shard"]:
        state["videos_per_shard"] = calibrate(data_dir, videos, opts)
    plans = plan_videos(selection, opts, state["videos_per_shard"])
    records, todo = resume_plans(shard_dir, plans, state)
    summary = Summary(manifest=None, reused_shards=len(records), selection=selection)
    progress = Progress("videos", len(videos), done=sum(len(p.items) for p in plans if p.name in records),
                        counts={"clips": sum(r["clips"] for r in records.values()),
                                "MB": sum(r["bytes"] for r in records.values()) / 1e6},
                        log_tenths=False, quiet=not show_progress)  # a log line per shard instead
    with progress:
        write_shards(data_dir, shard_dir, todo, opts, workers, state, records, summary, progress)
    skipped = sorted((s for r in records.values() for s in r["skipped"]), key=lambda s: s["path"])
    summary.manifest = finish(shard_dir, plans, records, options=asdict(opts), skipped=skipped,
                              clip_shape=clip_shape(opts.T, opts.size, opts.color_mode), scan=selection.report())
    for r in records.values():
        summary.videos += r["videos"]
        summary.clips += r["clips"]
        summary.bytes_written += r["bytes"]
    summary.skipped = skipped
    summary.wall_s = time.perf_counter() - started
    return summary


def write_shards(data_dir: Path, shard_dir: Path, todo: list[ShardPlan], opts: Options, workers: int, state: dict,
                 records: dict[str, dict], summary: Summary, progress: Progress) -> None:
    """Decode the videos of the shards to do (one pool task per video) and write each shard as it completes."""
    tasks = [(data_dir, rel, opts) for p in todo for rel in p.items]
    summary.processed = len(tasks)
    with worker_map(_process_task, tasks, workers) as results:
        for plan in todo:
            group = []
            for _ in plan.items:
                r = next(results)
                group.append(r)
                summary.decode_s += r.decode_s
                summary.task_s += r.task_s
                progress.advance(clips=0 if r.clips is None else len(r.clips))
            t0 = time.perf_counter()
            record = write_video_shard(shard_dir, plan, group, opts)
            summary.write_s += time.perf_counter() - t0
            record_shard(shard_dir, state, records, plan, record)
            progress.advance(0, MB=record["bytes"] / 1e6)
            progress.log(f"{plan.name}: {record['clips']} clips, {record['bytes'] / 1e6:.1f} MB")


# ---- command line

def print_summary(console, summary: Summary, shard_dir: Path, opts: Options) -> None:
    manifest = summary.manifest
    for split, entry in (manifest.splits if manifest else {}).items():
        console.print(f"{split}: {entry.videos} videos, {entry.clips} clips, {len(entry.shards)} shards", highlight=False)
    lines = scan_lines(summary.selection.report()) if summary.selection else []
    if manifest and manifest.source_fps is not None:
        lines += [rate_line(manifest.source_fps, opts.fps), *geometry_lines(manifest.sources)]
    for line in lines:
        console.print(line, highlight=False, markup=False)
    if summary.skipped:
        console.print(f"skipped {len(summary.skipped)} videos:", highlight=False)
        for s in summary.skipped:
            console.print(f"  {s['path']}: {s['reason']}", highlight=False, markup=False)
    rate = summary.processed / max(summary.wall_s, 1e-9)
    reused = f", {summary.reused_shards} shards reused" if summary.reused_shards else ""
    console.print(f"{summary.clips} clips, {summary.bytes_written / 1e6:.1f} MB in {shard_dir} "
                  f"({summary.wall_s:.1f} s, {rate:.1f} videos/s decoded{reused})", highlight=False)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Options]:
    p = argparse.ArgumentParser(prog="python -m preprocess.shard", description=__doc__.splitlines()[0])
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    p.add_argument("shard_dir", type=Path, metavar="SHARD_DIR")
    add_shard_args(p, workers=os.cpu_count() or 1)
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of videos hashed to val when no train/val/test folder decides")
    p.add_argument("--decoder", choices=["ffmpeg", "pyav"], default="ffmpeg")
    p.add_argument("--fps", type=parse_rate, default=None, metavar="N",
                   help="resample every video to N frames/s (25, 29.97, 30000/1001) before cutting clips "
                        "(default: each video's own rate); above a video's rate its frames are repeated (a "
                        f"warning), more than {MAX_UPSAMPLING:g}x its rate is refused unless --allow-upsampling")
    p.add_argument("--allow-upsampling", action="store_true",
                   help=f"accept --fps more than {MAX_UPSAMPLING:g}x a video's own rate")
    p.add_argument("--ext", action="append", default=None, metavar="EXT",
                   help="file extensions that are videos, any case; repeat or comma-separate "
                        f"(default: {','.join(e.lstrip('.') for e in VIDEO_EXTENSIONS)})")
    p.add_argument("--split-list", action="append", default=[], metavar="SPLIT=FILE",
                   help="the videos of a split (train, val or test, which is val), one per line (a path under "
                        "DATA_DIR, relative or absolute, a tail of it, or a file name) or a CSV column "
                        "(--split-column); with lists, only the videos they name are used")
    p.add_argument("--split-column", default="path", help="the column of CSV split lists (default path)")
    p.add_argument("--max-clips-per-video", type=int, default=None, metavar="N",
                   help="at most N clips per video, spread evenly over it")
    p.add_argument("--max-videos", type=int, default=None, metavar="N",
                   help="use only N videos (a seeded, reproducible choice), for quick runs")
    p.add_argument("--scene-cut", type=float, default=None, metavar="CHANGE",
                   help="leave out clips that span a scene cut: two consecutive frames whose mean absolute change "
                        "(0-1, at --size) exceeds CHANGE, e.g. 0.15; interpolation cannot learn across a cut")
    args = p.parse_args(argv)
    for name in ("size", "T", "frame_stride", "shard_size", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.clip_stride is not None and args.clip_stride < 1:
        p.error("--clip-stride must be >= 1")
    if not 0.0 <= args.val_fraction <= 1.0:
        p.error("--val-fraction must be in [0, 1]")
    if args.scene_cut is not None and not 0.0 < args.scene_cut < 1.0:
        p.error("--scene-cut must be in (0, 1)")
    for name in ("max_clips_per_video", "max_videos"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    extensions = normalize_extensions(args.ext) if args.ext else VIDEO_EXTENSIONS
    if not extensions:
        p.error("--ext names no extension")
    opts = Options(**shard_options(args), val_fraction=args.val_fraction, decoder=args.decoder, fps=args.fps,
                   extensions=extensions, split_lists=tuple(parse_split_list(p, v) for v in args.split_list),
                   split_column=args.split_column, max_clips_per_video=args.max_clips_per_video,
                   max_videos=args.max_videos, scene_cut=args.scene_cut)
    return args, opts


def parse_rate(text: str) -> float:
    """--fps: a positive number or fraction."""
    try:
        rate = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a frame rate: {text!r} (e.g. 25, 29.97, 30000/1001)") from None
    if rate <= 0:
        raise argparse.ArgumentTypeError(f"the frame rate must be > 0, got {text!r}")
    return rate


def parse_split_list(p: argparse.ArgumentParser, value: str) -> tuple[str, str]:
    """--split-list SPLIT=FILE -> (split, file)."""
    split, sep, path = value.partition("=")
    if not sep or split not in SPLIT_NAMES or not path:
        p.error(f"--split-list wants SPLIT=FILE with SPLIT one of {', '.join(SPLIT_NAMES)}, got {value!r}")
    return split, path


def main(argv: list[str] | None = None) -> int:
    args, opts = parse_args(argv)
    return run_cli(lambda: _main(args, opts), interrupted="rerun the same command to resume")


def _main(args: argparse.Namespace, opts: Options) -> int:
    from rich.console import Console

    if opts.decoder == "pyav":
        try:
            import av  # noqa: F401
        except ImportError:
            raise UserError("--decoder pyav needs PyAV: `pip install av` (or use --decoder ffmpeg)") from None
    summary = run(args.data_dir, args.shard_dir, opts, workers=args.workers, overwrite=args.overwrite,
                  show_progress=True, allow_upsampling=args.allow_upsampling)
    print_summary(Console(), summary, args.shard_dir, opts)
    if summary.manifest is None:
        print(f"error: no usable clips: all {len(summary.skipped)} videos were skipped (reasons above)",
              file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
