"""preprocess.bair and preprocess.tfrecords: BAIR softmotion30_44k TFRecords -> shards / MP4s, no TensorFlow.

The fixtures write small TFRecord files in the real layout (softmotion30_44k/{train,test}/traj_*.tfrecords)
with the real keys ({i}/image_aux1/encoded, {i}/image_main/encoded as raw 64x64x3 bytes, {i}/action,
{i}/endeffector_pos) using tfrecord's own writer, so framing and CRCs are those of a real file.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import crc32c
import numpy as np
import pytest

from preprocess import bair
from preprocess.tfrecords import iter_records, masked_crc32c, parse_example
from preprocess.video import resize_frames, to_gray

from tfrecord.writer import TFRecordWriter  # noqa: E402  (after preprocess.tfrecords: keeps torch out)

ROOT = Path(__file__).resolve().parents[1]


def make_trajectory(seed: int) -> dict[str, np.ndarray]:
    """30 frames per camera: a smooth moving pattern plus a little noise, so MP4s stay close to it."""
    rng = np.random.default_rng(seed)
    t = np.arange(30)[:, None, None, None]
    y, x = np.mgrid[0:64, 0:64][..., None]
    phase = rng.uniform(0, 2 * np.pi, size=3)
    base = 127 + 90 * np.sin((x + 2 * t) / (6 + 2 * np.arange(3)) + phase) * np.cos((y - t) / 9)
    noise = rng.integers(-6, 7, size=(2, 30, 64, 64, 3))
    aux1, main = (np.clip(base + n, 0, 255).astype(np.uint8) for n in noise)
    return {"aux1": aux1, "main": main,
            "action": rng.normal(size=(30, 4)).astype(np.float32),
            "endeffector_pos": rng.normal(size=(30, 3)).astype(np.float32)}


def write_tfrecords(path: Path, trajectories: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = TFRecordWriter(str(path))
    for traj in trajectories:
        datum = {}
        for i in range(30):
            datum[f"{i}/image_aux1/encoded"] = (traj["aux1"][i].tobytes(), "byte")
            datum[f"{i}/image_main/encoded"] = (traj["main"][i].tobytes(), "byte")
            datum[f"{i}/action"] = (traj["action"][i].tolist(), "float")
            datum[f"{i}/endeffector_pos"] = (traj["endeffector_pos"][i].tolist(), "float")
        writer.write(datum)
    writer.close()


@pytest.fixture
def dataset(tmp_path):
    """softmotion30_44k with 2 train files (3 + 2 records) and 1 test file (2 records)."""
    root = tmp_path / "softmotion30_44k"
    trajs = {}
    for rel, seeds in {"train/traj_0_to_2.tfrecords": [0, 1, 2], "train/traj_3_to_4.tfrecords": [3, 4],
                       "test/traj_0_to_1.tfrecords": [10, 11]}.items():
        trajs[rel] = [make_trajectory(s) for s in seeds]
        write_tfrecords(root / rel, trajs[rel])
    return root, trajs


def read_shards(shard_dir: Path, split: str) -> list[tuple[str, np.ndarray, dict]]:
    samples = []
    for shard in sorted(shard_dir.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(members):
            if name.endswith(".clip.npy"):
                key = name.removesuffix(".clip.npy")
                clip = np.load(io.BytesIO(members[name]), allow_pickle=False)
                samples.append((key, clip, json.loads(members[key + ".meta.json"])))
    return samples


def convert(root: Path, out: Path, **kw) -> tuple[dict | None, list[dict]]:
    """preprocess.bair.convert; the manifest as manifest.json holds it (a dict), or None."""
    workers = kw.pop("workers", 1)
    overwrite = kw.pop("overwrite", False)
    opts = bair.Options(**{"clip_stride": kw.get("T", 8) * kw.get("frame_stride", 1), **kw})
    manifest, skipped = bair.convert(root, out, opts, workers=workers, overwrite=overwrite)
    return (manifest.as_dict() if manifest is not None else None), skipped


def corrupt_record(path: Path, index: int) -> None:
    """Flip one data byte of record `index`: its data CRC fails, its length framing stays intact."""
    span = [s for s, _ in iter_records(path)][index]
    data = bytearray(path.read_bytes())
    data[span.offset + 12 + span.length // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- the TFRecord layer

def test_masked_crc_matches_tensorflow_definition_and_tfrecord_writer(tmp_path):
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    for data in (b"", b"abc", bytes(range(256)) * 5):
        assert masked_crc32c(data).to_bytes(4, "little") == TFRecordWriter.masked_crc(data)
    path = tmp_path / "a.tfrecords"
    write_tfrecords(path, [make_trajectory(0)])
    (span, data), = list(iter_records(path))
    assert span.index == 0 and span.offset == 0 and isinstance(data, bytes)
    features = parse_example(data)
    assert len(features) == 4 * 30 and len(features["29/image_main/encoded"].bytes_list.value[0]) == 12288


def test_decode_trajectory_reads_both_cameras_and_vectors(tmp_path):
    traj = make_trajectory(5)
    path = tmp_path / "a.tfrecords"
    write_tfrecords(path, [traj])
    (_, data), = list(iter_records(path))
    for camera in ("aux1", "main"):
        got = bair.decode_trajectory(data, camera)
        np.testing.assert_array_equal(got.frames, traj[camera])
    np.testing.assert_array_equal(got.actions, traj["action"])
    np.testing.assert_array_equal(got.endeffector_pos, traj["endeffector_pos"])


def test_resize_other_sizes():
    frames = make_trajectory(1)["aux1"][:3]
    assert resize_frames(frames, 48).shape == (3, 48, 48, 3)
    assert resize_frames(frames, 96).shape == (3, 96, 96, 3)
    flat = np.full((1, 64, 64, 3), 77, np.uint8)
    assert (resize_frames(flat, 48) == 77).all() and (resize_frames(flat, 16) == 77).all()


def test_to_gray_is_itu_601_luma():
    px = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [10, 20, 30]]], np.uint8)
    assert to_gray(px)[..., 0].tolist() == [[76, 150, 29, 255, 18]]


# ---- conversion to shards

@pytest.mark.parametrize("camera", ["aux1", "main"])
def test_shards_hold_exactly_the_source_frames_and_meta(dataset, tmp_path, camera):
    root, trajs = dataset
    manifest, skipped = convert(root, tmp_path / "shards", camera=camera)
    assert skipped == []
    assert manifest["clip_shape"] == [8, 64, 64, 3] and manifest["options"]["camera"] == camera
    assert manifest["splits"]["train"]["videos"] == 5 and manifest["splits"]["train"]["clips"] == 15
    assert manifest["splits"]["val"]["videos"] == 2 and manifest["splits"]["val"]["clips"] == 6
    for split in ("train", "val"):
        samples = read_shards(tmp_path / "shards", split)
        assert len(samples) == manifest["splits"][split]["clips"]
        assert len({key for key, _, _ in samples}) == len(samples)
        for _, clip, meta in samples:
            src = trajs[meta["source"]][meta["record"]]
            frames = meta["start_frame"] + np.arange(8)
            np.testing.assert_array_equal(clip, src[camera][frames])
            assert meta["split"] == split and meta["camera"] == camera and meta["fps"] == 10.0
            assert meta["frame_stride"] == 1 and meta["start_frame"] in (0, 8, 16)
            np.testing.assert_array_equal(np.float32(meta["actions"]), src["action"][frames])
            np.testing.assert_array_equal(np.float32(meta["endeffector_pos"]), src["endeffector_pos"][frames])
    assert (root / "test").is_dir() and all(s["source"].startswith("test/")
                                            for _, _, s in read_shards(tmp_path / "shards", "val"))


def test_T_frame_stride_and_clip_stride(dataset, tmp_path):
    root, trajs = dataset
    manifest, _ = convert(root, tmp_path / "shards", T=5, frame_stride=2, clip_stride=3)
    # one clip spans 9 frames: starts 0, 3, ..., 21 -> 8 clips per trajectory
    assert manifest["splits"]["train"]["clips"] == 5 * 8
    for _, clip, meta in read_shards(tmp_path / "shards", "train"):
        frames = meta["start_frame"] + 2 * np.arange(5)
        np.testing.assert_array_equal(clip, trajs[meta["source"]][meta["record"]]["aux1"][frames])
        assert meta["frame_stride"] == 2 and len(meta["actions"]) == 5


def test_gray_and_resize(dataset, tmp_path):
    root, trajs = dataset
    manifest, _ = convert(root, tmp_path / "shards", size=32, color_mode="gray")
    assert manifest["clip_shape"] == [8, 32, 32, 1]
    key, clip, meta = read_shards(tmp_path / "shards", "val")[0]
    src = trajs[meta["source"]][meta["record"]]["aux1"][meta["start_frame"] + np.arange(8)]
    small = resize_frames(src, 32)
    area = src.astype(np.float64).reshape(8, 32, 2, 32, 2, 3).mean(axis=(2, 4))  # 2x2 area average
    assert np.abs(small - area).max() <= 0.5
    np.testing.assert_array_equal(clip, to_gray(small))


def test_corrupt_record_is_reported_and_the_others_convert(dataset, tmp_path):
    root, trajs = dataset
    corrupt_record(root / "train/traj_0_to_2.tfrecords", 1)
    manifest, skipped = convert(root, tmp_path / "shards")
    assert skipped == manifest["skipped"]
    assert skipped == [{"path": "train/traj_0_to_2.tfrecords", "record": 1,
                        "reason": "corrupt record data (data CRC mismatch)"}]
    got = {(m["source"], m["record"]) for _, _, m in read_shards(tmp_path / "shards", "train")}
    assert got == {("train/traj_0_to_2.tfrecords", 0), ("train/traj_0_to_2.tfrecords", 2),
                   ("train/traj_3_to_4.tfrecords", 0), ("train/traj_3_to_4.tfrecords", 1)}
    assert manifest["splits"]["train"]["videos"] == 4


def test_truncated_file_keeps_the_records_before_the_damage(dataset, tmp_path):
    root, _ = dataset
    path = root / "train/traj_0_to_2.tfrecords"
    span = [s for s, _ in iter_records(path)][2]
    path.write_bytes(path.read_bytes()[: span.offset + 100])
    manifest, skipped = convert(root, tmp_path / "shards")
    assert [(s["path"], s["record"]) for s in skipped] == [("train/traj_0_to_2.tfrecords", 2)]
    assert "truncated" in skipped[0]["reason"] and "rest of the file" in skipped[0]["reason"]
    assert manifest["splits"]["train"]["videos"] == 4


def test_cli_reports_corrupt_record_with_file_and_index(dataset, tmp_path, capsys):
    root, _ = dataset
    corrupt_record(root / "test/traj_0_to_1.tfrecords", 0)
    assert bair.main([str(root), str(tmp_path / "shards"), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "skipped test/traj_0_to_1.tfrecords record 0: corrupt record data (data CRC mismatch)" in err


def test_nothing_usable_exits_nonzero(tmp_path, capsys):
    path = tmp_path / "softmotion30_44k/train/traj_0_to_0.tfrecords"
    write_tfrecords(path, [make_trajectory(0)])
    corrupt_record(path, 0)
    assert bair.main([str(tmp_path), str(tmp_path / "shards"), "--workers", "1"]) == 2
    assert "no usable record" in capsys.readouterr().err
    assert not (tmp_path / "shards/manifest.json").exists()


@pytest.mark.parametrize("setup, message", [
    ("missing", "does not exist"),
    ("empty", "no train/ or test/ folder"),
    ("no_files", "no .tfrecords files found"),
])
def test_clear_one_line_errors(tmp_path, capsys, setup, message):
    source = tmp_path / "src"
    if setup != "missing":
        source.mkdir()
    if setup == "no_files":
        (source / "train").mkdir()
        (source / "train/readme.txt").write_text("not a record")
    assert bair.main([str(source), str(tmp_path / "shards")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_preprocess_bair_does_not_import_torch():
    code = "import sys, preprocess.bair; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_cli_missing_dir_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "preprocess.bair", str(tmp_path / "nope"), str(tmp_path / "s")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "does not exist" in proc.stderr


def test_changed_options_are_refused_and_overwrite_restarts(dataset, tmp_path, capsys):
    root, _ = dataset
    convert(root, tmp_path / "shards")
    assert bair.main([str(root), str(tmp_path / "shards"), "--T", "4", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "T 8 -> 4" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert bair.main([str(root), str(tmp_path / "shards"), "--T", "4", "--overwrite", "--workers", "1"]) == 0
    assert json.loads((tmp_path / "shards/manifest.json").read_text())["clip_shape"] == [4, 64, 64, 3]


# `python -c KILLED MODE ARGS...`: preprocess.bair with ARGS, killed by SIGKILL (no cleanup at all).
# MODE "mid-write" (one worker): while writing the third shard, once one sample reached its temporary
# file. MODE "group" (a pool): the whole process group, the pool's workers too, after two shards finished.
KILLED = """
import os, signal, sys
import preprocess.plan as plan
from preprocess import bair
mode, calls = sys.argv.pop(1), []
def samples_then_die(samples):
    for k, sample in enumerate(samples):
        if k == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        yield sample
def write_shard(path, samples, real=plan.write_shard):
    calls.append(path)
    return real(path, samples_then_die(samples) if len(calls) == 3 else samples)
def record_shard(*args, real=bair.record_shard):
    real(*args)
    calls.append(args[3])
    if len(calls) == 2:
        os.killpg(0, signal.SIGKILL)
if mode == "mid-write":
    plan.write_shard = write_shard
else:
    bair.record_shard = record_shard
sys.exit(bair.main(sys.argv[1:]))
"""


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("mode, workers", [("mid-write", 1), ("group", 2)])
def test_rerun_after_kill_9_resumes_to_identical_shards(dataset, tmp_path, mode, workers):
    root, _ = dataset
    killed = tmp_path / "killed"
    args = [str(root), str(killed), "--shard-size", "3", "--workers", str(workers)]  # 7 shards of 1 record
    proc = subprocess.run([sys.executable, "-c", KILLED, mode, *args], cwd=ROOT, capture_output=True,
                          start_new_session=True)  # its own process group, so "group" kills nothing else
    assert proc.returncode == -9, proc.stderr.decode()
    finished = sorted(json.loads((killed / "progress.json").read_text())["shards"])
    assert finished == ["train-000000.tar", "train-000001.tar"]  # recorded in plan order
    assert not (killed / "manifest.json").exists()
    assert mode != "mid-write" or (killed / "train-000002.tar.tmp").stat().st_size > 0
    mtimes = {name: (killed / name).stat().st_mtime_ns for name in finished}

    assert bair.main(args) == 0
    assert all((killed / name).stat().st_mtime_ns == mtimes[name] for name in finished)  # kept, not rewritten
    convert(root, tmp_path / "straight", shard_size=3)
    assert folder_bytes(killed) == folder_bytes(tmp_path / "straight")  # shards, manifest and progress.json


def test_clips_spread_over_shards_and_output_is_deterministic(dataset, tmp_path):
    root, _ = dataset
    # 6 clips per shard = 2 trajectories per shard: train has 3 shards, val 1.
    m1, _ = convert(root, tmp_path / "a", shard_size=6, workers=1)
    m2, _ = convert(root, tmp_path / "b", shard_size=6, workers=2)
    assert [s["name"] for s in m1["splits"]["train"]["shards"]] == [f"train-{i:06d}.tar" for i in range(3)]
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert m1 == m2
    samples = read_shards(tmp_path / "a", "train")
    records = [(m["source"], m["record"]) for _, _, m in samples]
    assert len(set(records)) == 5 and len(records) == 15
    # neither the canonical order nor one trajectory's clips side by side
    assert records != sorted(records) and any(a[0] != b[0] for a, b in zip(records, records[1:]))


# ---- MP4 export

def test_to_mp4_writes_the_reference_layout(dataset, tmp_path, capsys):
    from evdm.ffmpeg import ffmpeg_exe

    root, trajs = dataset
    corrupt_record(root / "train/traj_3_to_4.tfrecords", 0)
    out = tmp_path / "mp4"
    assert bair.main([str(root), "--to-mp4", str(out), "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert "wrote 4 train and 2 val videos" in captured.out
    assert "skipped train/traj_3_to_4.tfrecords record 0: corrupt record data" in captured.err
    assert sorted(p.name for p in (out / "videos_train").iterdir()) == [
        "traj_0_to_2_00000.mp4", "traj_0_to_2_00001.mp4", "traj_0_to_2_00002.mp4", "traj_3_to_4_00001.mp4"]
    assert len(list((out / "videos_val").glob("*.mp4"))) == 2
    proc = subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-i", str(out / "videos_val/traj_0_to_1_00001.mp4"),
                           "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"], capture_output=True, check=True)
    frames = np.frombuffer(proc.stdout, np.uint8).reshape(-1, 64, 64, 3)
    assert frames.shape == (30, 64, 64, 3)
    error = np.abs(frames.astype(np.int16) - trajs["test/traj_0_to_1.tfrecords"][1]["aux1"]).mean()
    assert error < 6.0, error
