"""preprocess.shard end to end on tiny synthetic videos: content, determinism, resume, bad input."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from evdm.ffmpeg import ffmpeg_exe, write_mp4
from preprocess.inspect import main as inspect_main
from preprocess.inspect import read_samples
from preprocess.select import scan, split_of
from preprocess.shard import ADDED_OPTIONS, Options, UserError, main, run
from preprocess.state import PROGRESS_NAME
from preprocess.synth import render_video
from preprocess.writer import sha256_file

OPTS = Options(T=4, frame_stride=1, clip_stride=4, size=16, shard_size=6)


def decode_native(path, size):
    raw = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24",
                          "pipe:"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, size, size, 3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 train + 2 val videos of 16x16 with 8..13 frames, one in a nested folder, one .MP4."""
    d = tmp_path_factory.mktemp("data")
    names = ["videos_train/a.mp4", "videos_train/b.mp4", "videos_train/c.MP4", "videos_train/deep/d.mp4",
             "videos_train/e.mp4", "videos_train/f.mp4", "videos_val/g.mp4", "videos_val/h.mp4"]
    for i, name in enumerate(names):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        write_mp4(render_video((5, i), frames=8 + i % 6, size=16), d / name, fps=10)
    (d / "videos_train" / "notes.txt").write_text("ignored")
    return d


@pytest.fixture(scope="module")
def sharded(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    summary = run(data, out, OPTS, workers=1)
    return out, summary


def shard_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))} | {"manifest": (d / "manifest.json").read_bytes()}


def test_scan_finds_mp4_in_any_case_recursively(data):
    found, others = scan(data)
    assert found == sorted(found) and len(found) == 8
    assert "videos_train/c.MP4" in found and "videos_train/deep/d.mp4" in found
    assert others == {".txt": 1}  # notes.txt: counted, not decoded


def test_split_rule():
    assert split_of("videos_train/x.mp4", 0.5) == "train"
    assert split_of("a/VAL/x.mp4", 0.0) == "val"
    assert split_of("my_test_set/x.mp4", 0.0) == "val"
    assert split_of("train/val_part/x.mp4", 0.0) == "val"  # the deepest folder decides
    assert split_of("train.mp4", 1.0) == "val"  # file names do not decide; the hash does
    names = [f"clips/{i}.mp4" for i in range(400)]
    assert all(split_of(n, 0.0) == "train" for n in names)
    val = [n for n in names if split_of(n, 0.25) == "val"]
    assert 60 < len(val) < 140 and val == [n for n in names if split_of(n, 0.25) == "val"]


def test_manifest_matches_shard_contents(data, sharded):
    out, summary = sharded
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["clip_shape"] == [4, 16, 16, 3] and manifest["dtype"] == "uint8"
    assert manifest["options"]["T"] == 4 and manifest["skipped"] == []
    total = 0
    for split, entry in manifest["splits"].items():
        clips = 0
        sources = set()
        for shard in entry["shards"]:
            samples = read_samples(out / shard["name"])
            assert len(samples) == shard["clips"] and sha256_file(out / shard["name"]) == shard["sha256"]
            for key, s in samples.items():
                assert s["clip"].shape == (4, 16, 16, 3) and s["clip"].dtype == np.uint8
                assert s["meta"]["split"] == split and s["meta"]["frame_stride"] == 1 and s["meta"]["fps"] == 10
                sources.add(s["meta"]["source"])
            clips += len(samples)
        assert clips == entry["clips"] and len(sources) == entry["videos"]
        total += clips
    assert manifest["splits"]["val"]["videos"] == 2 and manifest["splits"]["train"]["videos"] == 6
    # frames 8..13 -> 2, 2, 2, 2, 3, 3, 2, 2 clips of 4
    assert total == summary.clips == 18
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(
        s["name"] for e in manifest["splits"].values() for s in e["shards"])


def test_clip_pixels_equal_a_direct_decode(data, sharded):
    out, _ = sharded
    for tar in sorted(out.glob("*.tar")):
        for s in read_samples(tar).values():
            meta = s["meta"]
            frames = decode_native(data / meta["source"], 16)
            start = meta["start_frame"]
            assert np.array_equal(s["clip"], frames[start:start + 4])


def test_clips_of_a_video_are_not_adjacent(sharded):
    out, _ = sharded
    with_keys = [list(read_samples(t)) for t in sorted(out.glob("train-*.tar"))]
    # Shards are filled in tar order by the writer; read_samples keeps that order.
    runs = [k.split("__f")[0] for keys in with_keys for k in keys]
    assert any(a != b for a, b in zip(runs, runs[1:]))
    assert runs != sorted(runs)


def test_deterministic_across_runs_and_worker_counts(data, sharded, tmp_path):
    out, _ = sharded
    run(data, tmp_path / "two", OPTS, workers=2)
    assert shard_bytes(tmp_path / "two") == shard_bytes(out)


@pytest.mark.parametrize("T, frame_stride, clip_stride, color_mode", [(3, 2, 2, "gray"), (8, 1, 2, "rgb")])
def test_clip_options(data, tmp_path, T, frame_stride, clip_stride, color_mode):
    opts = Options(T=T, frame_stride=frame_stride, clip_stride=clip_stride, size=12, color_mode=color_mode)
    summary = run(data, tmp_path, opts)
    channels = 1 if color_mode == "gray" else 3
    assert summary.manifest.clip_shape == (T, 12, 12, channels)
    for tar in tmp_path.glob("*.tar"):
        for s in read_samples(tar).values():
            assert s["clip"].shape == (T, 12, 12, channels)
            assert s["meta"]["start_frame"] % clip_stride == 0 and s["meta"]["frame_stride"] == frame_stride
    # video a has 8 frames: T=3 stride 2 spans 5 -> starts 0, 2 (4 would need frame 8).
    starts = sorted(s["meta"]["start_frame"] for t in tmp_path.glob("*.tar") for s in read_samples(t).values()
                    if s["meta"]["source"] == "videos_train/a.mp4")
    assert starts == ([0, 2] if T == 3 else [0])


def test_resume_after_a_crash(data, sharded, tmp_path):
    out, _ = sharded
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    (resumed / "manifest.json").unlink()
    victim = sorted(resumed.glob("train-*.tar"))[0]
    victim.unlink()  # a missing shard
    (resumed / "train-000001.tar.tmp").write_bytes(b"half a shard")  # a crash mid-write
    keep = sorted(resumed.glob("*.tar"))
    mtimes = {p: p.stat().st_mtime_ns for p in keep}
    summary = run(data, resumed, OPTS, workers=1)
    assert summary.reused_shards == len(keep)
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in keep)  # reused, not rewritten
    assert not list(resumed.glob("*.tmp"))
    assert shard_bytes(resumed) == shard_bytes(out)


def test_resume_redoes_a_corrupted_shard(data, sharded, tmp_path):
    out, _ = sharded
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    victim = sorted(resumed.glob("*.tar"))[-1]
    victim.write_bytes(victim.read_bytes()[:-1024])
    run(data, resumed, OPTS, workers=1)
    assert shard_bytes(resumed) == shard_bytes(out)


def test_a_folder_of_an_older_version_resumes(data, sharded, tmp_path):
    """progress.json written before options were added (fps, extensions, split lists, limits) lacks them;
    at the values that reproduce those runs the folder resumes, at another value it is refused."""
    out, _ = sharded
    d = tmp_path / "s"
    shutil.copytree(out, d)
    state = json.loads((d / PROGRESS_NAME).read_text())
    for key in ADDED_OPTIONS:
        del state["identity"]["options"][key]
    (d / PROGRESS_NAME).write_text(json.dumps(state))
    mtimes = {p: p.stat().st_mtime_ns for p in d.glob("*.tar")}
    assert run(data, d, OPTS, workers=1).reused_shards == len(mtimes)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    (d / PROGRESS_NAME).write_text(json.dumps(state))
    with pytest.raises(UserError, match=r"max_clips_per_video \(not recorded\) -> 1"):
        run(data, d, Options(**{**OPTS.__dict__, "max_clips_per_video": 1}), workers=1)


def test_different_options_need_overwrite(data, sharded, tmp_path):
    out, _ = sharded
    d = tmp_path / "s"
    shutil.copytree(out, d)
    with pytest.raises(UserError, match=r"T 4 -> 5"):
        run(data, d, Options(T=5, clip_stride=5, size=16), workers=1)
    summary = run(data, d, Options(T=5, clip_stride=5, size=16), workers=1, overwrite=True)
    assert summary.manifest.clip_shape == (5, 16, 16, 3)
    assert json.loads((d / PROGRESS_NAME).read_text())["identity"]["options"]["T"] == 5


def test_a_changed_split_list_is_named_on_resume(data, tmp_path, capsys):
    (tmp_path / "train.txt").write_text("a.mp4\nb.mp4\n")
    (tmp_path / "val.txt").write_text("g.mp4\n")
    opts = Options(**{**OPTS.__dict__, "split_lists": (("train", str(tmp_path / "train.txt")),
                                                       ("val", str(tmp_path / "val.txt")))})
    run(data, tmp_path / "s", opts, workers=1)
    (tmp_path / "val.txt").write_text("h.mp4\n")
    with pytest.raises(UserError, match=rf"different split lists \({re.escape(str(tmp_path / 'val.txt'))} changed\)"):
        run(data, tmp_path / "s", opts, workers=1)
    (tmp_path / "val.txt").write_text("# emptied\n")
    assert main([str(data), str(tmp_path / "t"), "--split-list", f"val={tmp_path / 'val.txt'}"]) == 2
    assert capsys.readouterr().err == (f"error: split list {tmp_path / 'val.txt'} names no video (empty, or only "
                                       "comments and blank lines)\n")


@pytest.mark.parametrize("options, inputs, lists, digests, cause", [
    ({"size": 16, "fps": None}, "b", "x", {}, "inputs (files added, removed or resized in the input folder)"),
    ({"size": 16, "fps": None}, "b", "y", {"t.txt": "1", "v.txt": "3"}, "split lists (v.txt changed)"),
    ({"size": 16, "fps": None}, "a", "y", {"t.txt": "1"}, "split lists (their contents changed)"),
    ({"size": 24, "fps": 25}, "b", "y", {}, "options (fps (not recorded) -> 25, size 16 -> 24)"),
])
def test_a_refused_resume_names_the_cause(tmp_path, options, inputs, lists, digests, cause):
    """Options first (they also choose the videos), then the lists' contents, then the input files; an option
    added since the folder was written (fps) is no change at the value that does what the old version did."""
    from preprocess.state import open_state

    recorded = {"options": {"size": 16}, "inputs": "a", "split_lists": "x"}
    files = {"t.txt": "1", "v.txt": "2"} if "v.txt" in digests else {}
    (tmp_path / PROGRESS_NAME).write_text(json.dumps({"identity": recorded, "split_list_files": files, "shards": {}}))
    with pytest.raises(UserError, match=re.escape(f"holds shards made with different {cause}; pass --overwrite")):
        open_state(tmp_path, {"options": options, "inputs": inputs, "split_lists": lists}, overwrite=False,
                   added={"fps": None}, list_digests=digests)


def test_foreign_nonempty_dir_is_refused(data, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        run(data, tmp_path, OPTS)
    run(data, tmp_path, OPTS, overwrite=True)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_pyav_decoder_writes_the_same_shards(data, sharded, tmp_path):
    pytest.importorskip("av", reason="PyAV (av) is not installed")
    out, _ = sharded
    run(data, tmp_path, Options(**{**OPTS.__dict__, "decoder": "pyav"}), workers=1)
    theirs, ours = shard_bytes(tmp_path), shard_bytes(out)
    assert theirs.pop("manifest") != ours.pop("manifest")  # it records the decoder
    assert theirs == ours


# ---- bad input: clear one-line messages, the rest processed, exit codes

@pytest.fixture(scope="module")
def messy(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("messy")
    for name in ["a.mp4", "b.mp4"]:
        (d / name).write_bytes((data / "videos_train" / name).read_bytes())
    (d / "text.mp4").write_text("hello")
    (d / "empty.mp4").write_bytes(b"")
    (d / "cut.mp4").write_bytes((data / "videos_train/a.mp4").read_bytes()[:300])
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "color=c=red:s=16x16:r=10",
                    "-frames:v", "0", "-c:v", "libx264", str(d / "zero.mp4")], check=True)
    write_mp4(render_video((9,), frames=3, size=16), d / "short.mp4")
    (d / "gone.mp4").symlink_to(d / "nowhere")
    return d


def test_bad_videos_are_listed_and_the_rest_processed(messy, tmp_path, capsys):
    assert main([str(messy), str(tmp_path), "--T", "4", "--size", "16", "--workers", "1"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"text.mp4", "empty.mp4", "cut.mp4", "zero.mp4", "short.mp4", "gone.mp4"}
    assert "empty" in reasons["empty.mp4"] and "unreadable" in reasons["gone.mp4"]
    assert "no video stream" in reasons["zero.mp4"] and "too short" in reasons["short.mp4"]
    assert "not a readable MP4" in reasons["cut.mp4"] and "not a readable MP4" in reasons["text.mp4"]
    assert sum(e["videos"] for e in manifest["splits"].values()) == 2
    printed = capsys.readouterr().out
    assert "skipped 6 videos" in printed and "short.mp4: too short" in printed


def test_nothing_usable_exits_nonzero(messy, tmp_path, capsys):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "x.mp4").write_text("nope")
    assert main([str(data), str(tmp_path / "out"), "--workers", "1"]) == 2
    assert "no usable clips" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("setup, message", [
    ("missing", "does not exist"),
    ("no_mp4", "no video files (.mp4 .m4v .mov .avi .mkv .webm, any case)"),
    ("no_ffmpeg", "pip install imageio-ffmpeg"),
    ("out_is_a_file", "exists and is not a folder"),
    ("out_cannot_be_created", "cannot be created as a folder (Not a directory)"),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, data, setup, message):
    src = {"missing": tmp_path / "nope", "no_mp4": tmp_path, "no_ffmpeg": data}.get(setup, data)
    env = dict(os.environ, EVDM_FFMPEG=str(tmp_path / "no-ffmpeg")) if setup == "no_ffmpeg" else None
    out = tmp_path / "out"
    if setup in ("out_is_a_file", "out_cannot_be_created"):
        out.write_text("a file where SHARD_DIR should go")
        out = out / "shards" if setup == "out_cannot_be_created" else out
    proc = subprocess.run([sys.executable, "-m", "preprocess.shard", str(src), str(out)],
                          capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["a_file", "a_file/shards"])
def test_a_bad_shard_dir_is_refused_before_any_video_is_decoded(data, tmp_path, capsys, monkeypatch, where):
    import preprocess.shard

    decoded = []
    monkeypatch.setattr(preprocess.shard, "process_video", lambda *a: decoded.append(a) or pytest.fail("decoded"))
    monkeypatch.setattr(preprocess.shard, "select_videos", lambda *a, **k: pytest.fail("scanned DATA_DIR first"))
    (tmp_path / "a_file").write_text("not a folder")
    assert main([str(data), str(tmp_path / where), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: SHARD_DIR {tmp_path / where} ") and len(err.strip().splitlines()) == 1
    assert not decoded


def test_inspect_prints_summary_and_writes_a_contact_sheet(sharded, tmp_path, capsys):
    out, _ = sharded
    png = tmp_path / "sheet.png"
    assert inspect_main([str(out), "--clips", "3", "--out", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "train: 6 videos" in printed and png.stat().st_size > 0
    assert Image.open(png).size == (2 * (4 * 18 - 2), 2 * (3 * 18 - 2))


def test_scene_cut_drops_the_clips_across_a_cut_and_is_recorded(tmp_path):
    data = tmp_path / "data"
    scenes = [render_video((seed, 0), 40, 16)[:9] for seed in (1, 2)]  # 9 slow frames each; a cut between
    for name, frames in (("videos_train/cut.mp4", np.concatenate(scenes)), ("videos_val/one.mp4", scenes[0])):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        write_mp4(frames, data / name, fps=10, crf=0, pix_fmt="rgb24")
    opts = Options(T=5, frame_stride=1, clip_stride=1, size=16, shard_size=50, scene_cut=0.1)
    summary = run(data, tmp_path / "shards", opts, workers=1)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["options"]["scene_cut"] == 0.1
    assert manifest["splits"]["train"]["clips"] == 10  # 14 windows of 5 in 18 frames, less the 4 across the cut
    assert manifest["splits"]["val"]["clips"] == 5 and summary.clips == 15
    train = read_samples(next((tmp_path / "shards").glob("train-*.tar")))
    assert sorted(s["meta"]["start_frame"] for s in train.values()) == [0, 1, 2, 3, 4, 9, 10, 11, 12, 13]
