"""preprocess.select: extensions, split lists (plain and CSV), the split each video gets, --max-videos."""

import pytest

from preprocess.options import UserError
from preprocess.select import (assign_from_lists, keep_some, normalize_extensions, read_split_list, scan,
                               select_videos)


def test_extensions_are_normalized():
    assert normalize_extensions(["avi", ".MKV", "mp4,webm", "avi", " .ts "]) == (".avi", ".mkv", ".mp4", ".webm", ".ts")
    assert normalize_extensions([",", "."]) == ()


def test_scan_keeps_video_extensions_in_any_case_and_counts_the_rest(tmp_path):
    for rel in ["a/x.AVI", "b.webm", "c.Mkv", "d.m4v", "e.mov", "f.mp4", "notes.txt", "README", "g.ts"]:
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    videos, others = scan(tmp_path)
    assert videos == ["a/x.AVI", "b.webm", "c.Mkv", "d.m4v", "e.mov", "f.mp4"]
    assert others == {"": 1, ".ts": 1, ".txt": 1}
    assert scan(tmp_path, (".ts",)) == (["g.ts"], {"": 1, ".avi": 1, ".m4v": 1, ".mkv": 1, ".mov": 1, ".mp4": 1,
                                                  ".txt": 1, ".webm": 1})


def test_plain_lists_drop_class_indexes_blank_lines_and_comments(tmp_path):
    path = tmp_path / "trainlist01.txt"
    path.write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\n# a comment\n\n  with space/v 2.avi  \n")
    assert read_split_list(path, "path") == ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "with space/v 2.avi"]


def test_csv_lists_read_a_column_by_name(tmp_path):
    path = tmp_path / "val.CSV"
    path.write_text("\ufefflabel,youtube_id,time_start\nabseiling,abc,10\nabseiling,,3\nair drumming,def,4\n")
    assert read_split_list(path, "youtube_id") == ["abc", "def"]
    with pytest.raises(UserError, match=r"no column 'path' \(columns: label, youtube_id, time_start\)"):
        read_split_list(path, "path")
    with pytest.raises(UserError, match="cannot be read"):
        read_split_list(tmp_path / "missing.txt", "path")


VIDEOS = ["UCF/ClassA/v_a1.avi", "UCF/ClassA/v_a2.avi", "kin/abc_000010_000020.mp4", "other/x.mkv"]


def test_lists_match_paths_names_stems_and_youtube_ids():
    splits, missing, unlisted = assign_from_lists(
        VIDEOS, {"train": ["UCF/ClassA/v_a1.avi", "v_a2", "gone.avi"], "val": ["abc", ".\\other\\x.mkv"]})
    assert splits == {"UCF/ClassA/v_a1.avi": "train", "UCF/ClassA/v_a2.avi": "train",
                      "kin/abc_000010_000020.mp4": "val", "other/x.mkv": "val"}  # a Windows-style ./ path too
    assert (missing, unlisted) == (["gone.avi"], 0)
    splits, missing, unlisted = assign_from_lists(VIDEOS, {"train": ["ClassA/v_a1.avi"]})  # relative to UCF/
    assert (splits, missing, unlisted) == ({"UCF/ClassA/v_a1.avi": "train"}, [], 3)


def test_a_video_in_two_lists_is_refused():
    with pytest.raises(UserError, match="UCF/ClassA/v_a1.avi is named by both the train and the val split list"):
        assign_from_lists(VIDEOS, {"train": ["v_a1.avi"], "val": ["UCF/ClassA/v_a1.avi"]})


def test_keep_some_is_seeded_and_stable_when_files_are_added():
    names = [f"v{i:03d}.mp4" for i in range(200)]
    chosen = keep_some(names, 20, seed=0)
    assert len(chosen) == 20 and chosen == sorted(chosen) and chosen == keep_some(names, 20, seed=0)
    assert chosen != keep_some(names, 20, seed=1)
    grown = keep_some(names + ["new.mp4"], 20, seed=0)
    assert len(set(grown) ^ set(chosen)) <= 2  # at most the new one in, one old one out


def test_select_videos_reports_what_it_left_out(tmp_path):
    for rel in ["train/a.mp4", "train/b.mp4", "val/c.mp4", "d.txt"]:
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    sel = select_videos(tmp_path, extensions=(".mp4",), lists=None, val_fraction=0.0, max_videos=2, seed=0)
    assert len(sel.videos) == 2 and sel.found == 3 and sel.over_max == 1
    assert sel.report() == {"videos_found": 3, "videos_used": 2, "not_videos": {".txt": 1}, "listed_missing": [],
                            "unlisted": 0, "over_max_videos": 1}
    full = select_videos(tmp_path, extensions=(".mp4",), lists=None, val_fraction=0.0, max_videos=None, seed=0)
    assert full.splits == {"train/a.mp4": "train", "train/b.mp4": "train", "val/c.mp4": "val"}
    with pytest.raises(UserError, match="the train split list names none of the 3 videos"):
        select_videos(tmp_path, extensions=(".mp4",), lists={"train": ["zzz.mp4"]}, val_fraction=0.0,
                      max_videos=None, seed=0)
    with pytest.raises(UserError, match=r"no video files \(\.avi, any case\)"):
        select_videos(tmp_path, extensions=(".avi",), lists=None, val_fraction=0.0, max_videos=None, seed=0)


def test_absolute_paths_under_data_dir_match(tmp_path):
    data = tmp_path / "data"
    for rel in ["train/a.mp4", "val/b.mp4"]:
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(b"")
    link = tmp_path / "link"
    link.symlink_to(data)
    lists = {"train": [str(data / "train" / "a.mp4")], "val": [f"{link}//val/../val/b.mp4", "/elsewhere/b.mp4"]}
    sel = select_videos(link, extensions=(".mp4",), lists=lists, val_fraction=0.0, max_videos=None, seed=0)
    assert sel.splits == {"train/a.mp4": "train", "val/b.mp4": "val"}  # DATA_DIR as given, or its links resolved
    assert sel.listed_missing == ["/elsewhere/b.mp4"]  # outside DATA_DIR: a name that matches nothing


def test_empty_lists_and_a_split_left_without_videos_are_refused(tmp_path):
    (tmp_path / "comments.txt").write_text("# nothing here\n\n")
    (tmp_path / "header.csv").write_text("path,label\n")
    for name in ("comments.txt", "header.csv"):
        with pytest.raises(UserError, match=f"split list {tmp_path / name} names no video"):
            read_split_list(tmp_path / name, "path")
    (tmp_path / "a.mp4").write_bytes(b"")
    with pytest.raises(UserError, match=r"the val split list \(test=t.txt\) names none of the 1 videos under .* "
                                        r"\(first listed: zzz.mp4\): that split would be empty"):
        select_videos(tmp_path, extensions=(".mp4",), lists={"train": ["a.mp4"], "val": ["zzz.mp4"]},
                      val_fraction=0.0, max_videos=None, seed=0, list_files={"val": "test=t.txt"})


def test_a_name_of_several_videos_is_refused_and_a_whole_path_chooses():
    videos = ["a/x.mp4", "b/x.mp4", "x/c.mp4", "y/x/c.mp4"]
    for name in ("x.mp4", "x"):
        with pytest.raises(UserError, match=rf"the train split list's '{name}' matches 2 videos \(a/x.mp4, b/x.mp4\); "
                                            r"write the path under DATA_DIR \(e.g. a/x.mp4\) to choose one"):
            assign_from_lists(videos, {"train": [name]})
    assert assign_from_lists(videos, {"train": ["b/x.mp4", "x/c.mp4"]}) == (
        {"b/x.mp4": "train", "x/c.mp4": "train"}, [], 2)  # x/c.mp4 is also a tail of y/x/c.mp4: the path wins
