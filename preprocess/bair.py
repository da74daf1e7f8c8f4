"""`python -m preprocess.bair SOURCE_DIR SHARD_DIR [options]`: BAIR robot pushing TFRecords -> shards.

Reads the original softmotion30_44k release (train/ and test/ folders of traj_*.tfrecords; one
tf.train.Example per 30-frame trajectory) without TensorFlow and writes shards in the format of
preprocess.shard: train shards from train/, val shards from test/. `--to-mp4 OUT_DIR` writes
OUT_DIR/videos_train/*.mp4 and OUT_DIR/videos_val/*.mp4 instead.

Per frame i a record holds (tensorflow_datasets video/bair_robot_pushing.py): `{i}/image_aux1/encoded`
and `{i}/image_main/encoded`, raw RGB uint8 64x64x3 (12,288 bytes, not PNG), `{i}/action` (4 floats) and
`{i}/endeffector_pos` (3 floats). The dataset states no frame rate: meta.json and the MP4s say 10 fps.

Plan, then work, with preprocess.plan as preprocess.shard does: a framing scan lists every record;
a seeded permutation deals each split's records into fixed groups, one group per shard; each
shard's clips are shuffled with a seed of their own and written atomically, and a rerun of the same
command resumes. Same input and options -> same bytes, whatever --workers. A corrupt record is
reported (file + record index) and skipped; see preprocess.tfrecords.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from evdm.ffmpeg import ffmpeg_exe, write_mp4
from evdm.data.schema import COLOR_CHANNELS, MANIFEST_NAME, clip_shape, encode_sample, make_key
from evdm.lock import lock_folder
from preprocess.options import ShardOptions, UserError, add_shard_args, run_cli, shard_options
from preprocess.plan import (ShardPlan, finish, inputs_digest, plan_shards, record_shard, resume_plans,
                             worker_map, write_planned_shard)
from preprocess.progress import Progress
from preprocess.state import open_state
from preprocess.tfrecords import RecordError, iter_records, parse_example, read_record_at
from preprocess.video import VideoError, clip_span, clip_starts, cut_all_clips, prepare_frames
from preprocess.writer import SPLITS

SPLIT_FOLDERS = dict(zip(SPLITS, ("train", "test")))  # evdm split -> softmotion30_44k folder
MP4_FOLDERS = {"train": "videos_train", "val": "videos_val"}  # the layout preprocess.shard reads
RECORD_SUFFIXES = (".tfrecords", ".tfrecord")
CAMERAS = ("aux1", "main")
BAIR_FRAMES = 30
BAIR_SIZE = 64
BAIR_FPS = 10.0  # not published with the dataset; 10 is the usual assumption
MP4_CRF, MP4_PIX_FMT = 10, "yuv444p"  # as preprocess.synth: decoded frames stay close to the source


@dataclass(frozen=True, kw_only=True)
class Options(ShardOptions):
    """Everything that decides the shards' bytes; recorded in the manifest and checked on resume."""

    camera: str = "aux1"


@dataclass(frozen=True)
class RecordRef:
    split: str
    source: str  # tfrecord path relative to the dataset root, e.g. "train/traj_0_to_255.tfrecords"
    index: int  # record index within the file
    offset: int  # byte offset of its framing


@dataclass(frozen=True)
class Trajectory:
    frames: np.ndarray  # uint8 [N, 64, 64, 3]
    actions: np.ndarray  # float32 [N, 4]
    endeffector_pos: np.ndarray  # float32 [N, 3]


# ---- pure functions on one record

def _values(features, key: str, kind: str):
    if key not in features:
        raise RecordError(f"missing feature {key!r}")
    return getattr(features[key], kind).value


def decode_trajectory(data: bytes, camera: str = "aux1") -> Trajectory:
    """One serialized BAIR Example -> its frames for `camera`, actions and end-effector positions."""
    features = parse_example(data)
    image_key = "{}/image_" + camera + "/encoded"
    n = sum(1 for key in features if key.endswith(f"/image_{camera}/encoded"))
    if n == 0:
        raise RecordError(f"no '{image_key.format('i')}' features (not a BAIR record, or another camera)")
    frames, actions, positions = [], [], []
    for i in range(n):
        image = _values(features, image_key.format(i), "bytes_list")
        if len(image) != 1 or len(image[0]) != BAIR_SIZE * BAIR_SIZE * 3:
            got = f"{len(image[0])} bytes" if len(image) == 1 else f"{len(image)} values"
            raise RecordError(f"{image_key.format(i)} holds {got}, not one raw 64x64 RGB image (12288 bytes)")
        frames.append(np.frombuffer(image[0], np.uint8).reshape(BAIR_SIZE, BAIR_SIZE, 3))
        for key, dim, out in ((f"{i}/action", 4, actions), (f"{i}/endeffector_pos", 3, positions)):
            values = _values(features, key, "float_list")
            if len(values) != dim:
                raise RecordError(f"{key} holds {len(values)} floats, not {dim}")
            out.append(np.asarray(values, np.float32))
    return Trajectory(np.stack(frames), np.stack(actions), np.stack(positions))


def clip_meta(ref: RecordRef, traj: Trajectory, start: int, opts: Options) -> dict:
    frames = [start + k * opts.frame_stride for k in range(opts.T)]
    return {"source": ref.source, "record": ref.index, "start_frame": start, "frame_stride": opts.frame_stride,
            "fps": BAIR_FPS, "split": ref.split, "camera": opts.camera,
            "actions": traj.actions[frames].tolist(), "endeffector_pos": traj.endeffector_pos[frames].tolist()}


def skip_entry(source: str, index: int | None, reason: str) -> dict:
    return {"path": source, "record": index, "reason": reason}


# ---- scan and plan

def find_sources(source_dir: Path) -> tuple[Path, dict[str, list[str]]]:
    """(dataset root, {split: sorted tfrecord paths relative to it}); accepts the untar folder too."""
    if not source_dir.is_dir():
        raise UserError(f"SOURCE_DIR {source_dir} does not exist or is not a folder")
    root = source_dir / "softmotion30_44k" if (source_dir / "softmotion30_44k").is_dir() else source_dir
    if not any((root / folder).is_dir() for folder in SPLIT_FOLDERS.values()):
        raise UserError(f"no train/ or test/ folder in {root} (expected softmotion30_44k/{{train,test}}/*.tfrecords)")
    files = {split: sorted(p.relative_to(root).as_posix() for p in (root / folder).glob("*")
                           if p.suffix in RECORD_SUFFIXES and p.is_file())
             for split, folder in SPLIT_FOLDERS.items() if (root / folder).is_dir()}
    if not any(files.values()):
        raise UserError(f"no .tfrecords files found in {root}/train or {root}/test")
    return root, files


def scan_records(root: Path, split: str, source: str) -> tuple[list[RecordRef], list[dict]]:
    """Every record of one file whose framing is intact, and skip entries for the rest of the file."""
    refs, skipped = [], []
    try:
        for span, item in iter_records(root / source):
            if isinstance(item, RecordError) and span.length < 0:
                skipped.append(skip_entry(source, span.index, str(item)))
            else:  # a data CRC error is found again, and reported, when the shard reads the record
                refs.append(RecordRef(split, source, span.index, span.offset))
    except OSError as err:
        skipped.append(skip_entry(source, None, f"unreadable file ({err.strerror or err})"))
    if not refs and not skipped:
        skipped.append(skip_entry(source, None, "empty file (no records)"))
    return refs, skipped


def plan_records(refs: list[RecordRef], opts: Options, records_per_shard: int) -> list[ShardPlan]:
    """Each split's records dealt, in a seeded random order, into shards of records_per_shard."""
    return plan_shards({split: [r for r in refs if r.split == split] for split in SPLITS}, opts.seed,
                       records_per_shard)


# ---- writing one shard (runs in the pool)

def read_clips(root: Path, refs: tuple[RecordRef, ...], opts: Options) -> tuple[list[tuple], int, list[dict]]:
    """([(key, clip, meta)] of these records, trajectories read, skip entries for the unusable ones)."""
    items, skipped, videos = [], [], 0
    handles = {}
    try:
        for ref in refs:
            try:
                if ref.source not in handles:
                    handles[ref.source] = open(root / ref.source, "rb")
                traj = decode_trajectory(read_record_at(handles[ref.source], ref.offset)[0], opts.camera)
                starts, clips = cut_all_clips(prepare_frames(traj.frames, opts.size, opts.color_mode), opts.T,
                                              opts.frame_stride, opts.clip_stride)
            except (RecordError, VideoError, OSError) as err:
                skipped.append(skip_entry(ref.source, ref.index, str(err)))
                continue
            videos += 1
            items += [(make_key(f"{ref.source}#{ref.index:05d}", start), clip, clip_meta(ref, traj, start, opts))
                      for start, clip in zip(starts, clips)]
    finally:
        for f in handles.values():
            f.close()
    return items, videos, skipped


def write_record_shard(args: tuple[Path, Path, ShardPlan, Options]) -> dict:
    """Read, cut and write one shard (none when it gets no clips); returns its progress record."""
    root, shard_dir, plan, opts = args
    items, videos, skipped = read_clips(root, plan.items, opts)
    return write_planned_shard(shard_dir, plan, opts.seed, items, lambda item: encode_sample(*item),
                               videos=videos, skipped=skipped)


# ---- the runs

def check_options(opts: Options, *, clips: bool = True) -> int:
    """Raise UserError for impossible options; return the clips one 30-frame trajectory gives."""
    if opts.camera not in CAMERAS or opts.color_mode not in COLOR_CHANNELS:
        raise UserError(f"camera must be one of {CAMERAS} and color_mode one of {tuple(COLOR_CHANNELS)}")
    if min(opts.T, opts.frame_stride, opts.clip_stride, opts.size, opts.shard_size) < 1:
        raise UserError("T, frame_stride, clip_stride, size and shard_size must be >= 1")
    if not clips:
        return 0
    per_record = len(clip_starts(BAIR_FRAMES, opts.T, opts.frame_stride, opts.clip_stride))
    if per_record == 0:
        raise UserError(f"T={opts.T} with frame_stride={opts.frame_stride} spans "
                        f"{clip_span(opts.T, opts.frame_stride)} frames; BAIR trajectories have {BAIR_FRAMES}")
    return per_record


def _sorted_skips(skipped: list[dict]) -> list[dict]:
    return sorted(skipped, key=lambda s: (s["path"], -1 if s["record"] is None else s["record"]))


def scan_sources(root: Path, files: dict[str, list[str]]) -> tuple[list[RecordRef], list[dict]]:
    """Every readable record of every file, and skip entries for the damaged parts (a framing scan)."""
    refs, skipped = [], []
    with Progress("files", sum(map(len, files.values()))) as progress:
        for split, sources in files.items():
            for source in sources:
                found, bad = scan_records(root, split, source)
                refs += found
                skipped += bad
                progress.advance()
    return refs, skipped


def convert(source_dir: Path, shard_dir: Path, opts: Options, *, workers: int = 1,
            overwrite: bool = False) -> tuple[dict | None, list[dict]]:
    """Write the shards and the manifest, resuming an interrupted run of the same command.

    Returns (manifest, or None when no clip came out; skipped). SHARD_DIR is locked for the whole run
    (evdm.lock).
    """
    with lock_folder(shard_dir, "SHARD_DIR", UserError):  # first: a second run is refused before it scans
        root, files = find_sources(source_dir)
        per_record = check_options(opts)
        inputs = inputs_digest(root, [source for sources in files.values() for source in sources])
        state = open_state(shard_dir, {"options": asdict(opts), "inputs": inputs}, overwrite=overwrite)
        refs, skipped = scan_sources(root, files)
        state["videos_per_shard"] = max(1, round(opts.shard_size / per_record))
        plans = plan_records(refs, opts, state["videos_per_shard"])
        records, todo = resume_plans(shard_dir, plans, state)
        tasks = [(root, shard_dir, plan, opts) for plan in todo]
        with Progress("records", len(refs), done=sum(len(p.items) for p in plans if p.name in records)) as progress, \
                worker_map(write_record_shard, tasks, workers, tmp_dir=shard_dir) as results:
            for plan, record in zip(todo, results):
                record_shard(shard_dir, state, records, plan, record)
                progress.advance(len(plan.items))
        skipped = _sorted_skips(skipped + [s for r in records.values() for s in r["skipped"]])
        manifest = finish(shard_dir, plans, records, options=asdict(opts), skipped=skipped,
                          clip_shape=clip_shape(opts.T, opts.size, opts.color_mode))
        return manifest, skipped


def export_file(args: tuple[Path, Path, str, str, Options]) -> tuple[int, list[dict]]:
    """Write one tfrecord file's trajectories as MP4s; returns (videos written, skipped)."""
    root, out_dir, split, source, opts = args
    written, skipped = 0, []
    folder = out_dir / MP4_FOLDERS[split]
    try:
        for span, item in iter_records(root / source):
            try:
                if isinstance(item, RecordError):
                    raise item
                frames = prepare_frames(decode_trajectory(item, opts.camera).frames, opts.size, opts.color_mode)
            except RecordError as err:
                skipped.append(skip_entry(source, span.index, str(err)))
                continue
            write_mp4(frames, folder / f"{Path(source).stem}_{span.index:05d}.mp4", fps=BAIR_FPS,
                      crf=MP4_CRF, pix_fmt=MP4_PIX_FMT)
            written += 1
    except OSError as err:
        skipped.append(skip_entry(source, None, f"unreadable file ({err.strerror or err})"))
    return written, skipped


def export_mp4(source_dir: Path, out_dir: Path, opts: Options, *, workers: int = 1) -> tuple[dict, list[dict]]:
    """Write OUT_DIR/videos_{train,val}/{file stem}_{record:05d}.mp4; returns ({split: videos}, skipped)."""
    root, files = find_sources(source_dir)
    check_options(opts, clips=False)
    ffmpeg_exe()  # fail before any work when there is none
    for split in files:
        (out_dir / MP4_FOLDERS[split]).mkdir(parents=True, exist_ok=True)
    tasks = [(root, out_dir, split, source, opts) for split, sources in files.items() for source in sources]
    counts, skipped = dict.fromkeys(files, 0), []
    # Threads suffice: the ffmpeg subprocess does the heavy part.
    with Progress("files", len(tasks)) as progress, ThreadPoolExecutor(max(1, workers)) as pool:
        for (_, _, split, _, _), (written, bad) in zip(tasks, pool.map(export_file, tasks)):
            counts[split] += written
            skipped += bad
            progress.advance()
    return counts, _sorted_skips(skipped)


# ---- command line

def _report_skips(skipped: list[dict], where: str, shown: int = 10) -> None:
    for s in skipped[:shown]:
        record = "" if s["record"] is None else f" record {s['record']}"
        print(f"skipped {s['path']}{record}: {s['reason']}", file=sys.stderr)
    if len(skipped) > shown:
        print(f"... and {len(skipped) - shown} more skipped (all listed in {where})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preprocess.bair", description=__doc__.splitlines()[0])
    parser.add_argument("source_dir", type=Path, help="softmotion30_44k, or the folder the archive was untarred in")
    parser.add_argument("shard_dir", type=Path, nargs="?", help="where the shards and manifest.json go")
    parser.add_argument("--to-mp4", type=Path, metavar="OUT_DIR", help="write MP4s (videos_train/, videos_val/) "
                        "instead of shards")
    add_shard_args(parser, workers=min(4, multiprocessing.cpu_count()))
    parser.add_argument("--camera", choices=CAMERAS, default="aux1", help="aux1 (default, the usual one) or main")
    args = parser.parse_args(argv)
    if (args.shard_dir is None) == (args.to_mp4 is None):
        parser.error("give SHARD_DIR, or --to-mp4 OUT_DIR (one of them)")
    opts = Options(**shard_options(args), camera=args.camera)
    if args.to_mp4 is not None:
        return run_cli(lambda: _mp4_main(args, opts), interrupted="rerun the same command")
    return run_cli(lambda: _shards_main(args, opts), interrupted="rerun the same command to resume")


def _mp4_main(args: argparse.Namespace, opts: Options) -> int:
    counts, skipped = export_mp4(args.source_dir, args.to_mp4, opts, workers=args.workers)
    _report_skips(skipped, "the lines above")
    if not sum(counts.values()):
        print(f"error: no usable record in {args.source_dir}; nothing written", file=sys.stderr)
        return 2
    print(f"wrote {counts.get('train', 0)} train and {counts.get('val', 0)} val videos to {args.to_mp4}")
    return 0


def _shards_main(args: argparse.Namespace, opts: Options) -> int:
    manifest, skipped = convert(args.source_dir, args.shard_dir, opts, workers=args.workers, overwrite=args.overwrite)
    _report_skips(skipped, f"{args.shard_dir / MANIFEST_NAME}" if manifest else "the lines above")
    if manifest is None:
        print(f"error: no usable record in {args.source_dir}; no shards written", file=sys.stderr)
        return 2
    parts = [f"{s.clips} {name} clips from {s.videos} trajectories in {len(s.shards)} shards"
             for name, s in manifest.splits.items()]
    print(f"wrote {' and '.join(parts)} to {args.shard_dir}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
