"""No output of evaluate, sample.py or preprocess.inspect replaces, unasked, one of the command's inputs, a
checkpoint (known by its content, whatever its name), a shard or a manifest: one line, exit 2, before any
work, the file untouched. An ordinary earlier output (eval.json) is still replaced."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, SIZE, T, make_checkpoint, write_square_shards
from evdm import evaluate as ev
from evdm.atomic import output_problem
from preprocess.inspect import main as inspect_main


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A folder with runs/x/last.pt, a copy of it under a foreign name, and shards/ (val-*.tar, manifest.json)."""
    root = tmp_path_factory.mktemp("guard")
    make_checkpoint(root / "runs" / "x" / "last.pt", train_steps=1)
    shutil.copy(root / "runs" / "x" / "last.pt", root / "runs" / "x" / "weights.bin")
    write_square_shards(root / "shards", T=T, size=SIZE, train_shards=1, val_shards=1, per_shard=2)
    return root


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(rc: int, capsys, flag: str, path: Path, what: str) -> None:
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, (out, err)
    assert err.startswith(f"error: {flag} {path} ") and what in err, err
    assert "clips" not in out and "wrote" not in out  # refused before any work


def evaluate_main(run: Path, *flags: str) -> int:
    return ev.main(["--ckpt", str(run / "runs/x/last.pt"), "--shards", str(run / "shards/val-*.tar"), "--num", "1",
                    "--steps", "1", "--device", "cpu", *flags])


@pytest.mark.parametrize("flag", ["--json", "--examples"])
@pytest.mark.parametrize("target, what", [
    ("runs/x/last.pt", "is an input of this command, which this would replace"),  # the command
    ("runs/x/weights.bin", "is a checkpoint"),  # by its content: no .pt suffix
    ("shards/val-000000.tar", "is an input of this command"),
    ("shards/train-000000.tar", "is a shard"),
    ("shards/manifest.json", "is a shard folder's manifest"),
    ("link.png", "is an input of this command (the same file as"),  # a link to the checkpoint
])
def test_evaluate_never_writes_over_a_checkpoint_a_shard_or_a_manifest(run, capsys, flag, target, what):
    link = run / "link.png"
    if not link.is_symlink():
        link.symlink_to(run / "runs/x/last.pt")
    path = run / target
    before = digest(path)
    refused(evaluate_main(run, flag, str(path)), capsys, flag, path, what)
    assert digest(path) == before


def test_evaluate_still_replaces_an_earlier_result(run, tmp_path):
    earlier = tmp_path / "eval.json"
    earlier.write_text('{"old": true}\n')
    assert evaluate_main(run, "--json", str(earlier)) == 0
    assert "rows" in json.loads(earlier.read_text())


def sample_module():
    spec = importlib.util.spec_from_file_location("sample_entry", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample_main(args: list) -> int:
    return sample_module().main([str(a) for a in args])


def test_sample_out_dir_holding_a_checkpoint_under_an_output_name_is_refused(run, tmp_path, capsys):
    """A checkpoint saved as grid_000.gif (a name sample.py writes) in --out_dir: refused, untouched."""
    out = tmp_path / "samples"
    out.mkdir()
    disguised = out / "grid_000.gif"
    shutil.copy(run / "runs/x/last.pt", disguised)
    rc = sample_main(["--ckpt", run / "runs/x/last.pt", "--shards", run / "shards/val-*.tar", "--num", 1,
                      "--steps", 1, "--device", "cpu", "--out_dir", out])
    refused(rc, capsys, "--out_dir", out, "holds grid_000.gif, a checkpoint")
    assert digest(disguised) == digest(run / "runs/x/last.pt") and sorted(out.iterdir()) == [disguised]


def test_sample_out_dir_holding_an_input_image_is_refused(run, tmp_path, capsys):
    """--start_images out/sample_000.png with --out_dir out: the first sample's strip would replace it."""
    out = tmp_path / "samples"
    out.mkdir()
    images = [out / f"{name}.png" for name in ("sample_000", "b", "c", "d")]
    for i, path in enumerate(images):
        Image.fromarray(np.full((SIZE, SIZE, 3), 40 * i, np.uint8)).save(path)
    before = [digest(p) for p in images]
    rc = sample_main(["--ckpt", run / "runs/x/last.pt", "--start_images", *images[:2], "--end_images", *images[2:],
                      "--steps", 1, "--device", "cpu", "--out_dir", out])
    refused(rc, capsys, "--out_dir", out, "an input of this command")
    assert [digest(p) for p in images] == before and sorted(out.iterdir()) == sorted(images)


def test_sample_out_dir_holding_inputs_under_other_names_is_used(run, tmp_path):
    """Endpoint images kept in --out_dir under names sample.py does not write are read, not refused; and
    every file it writes there matches its written_names (what its --out_dir check looks at)."""
    out = tmp_path / "samples"
    out.mkdir()
    images = [out / f"frame{i}.png" for i in range(4)]
    for path in images:
        Image.fromarray(np.full((SIZE, SIZE, 3), 99, np.uint8)).save(path)
    module = sample_module()
    assert module.main([str(a) for a in ["--ckpt", run / "runs/x/last.pt", "--start_images", *images[:2],
                                         "--end_images", *images[2:], "--steps", 1, "--device", "cpu",
                                         "--out_dir", out]]) == 0
    written = [p for p in out.iterdir() if p not in images]
    assert written and all(any(p.match(n) for n in module.written_names(True)) for p in written)
    shards = tmp_path / "from_shards"
    assert module.main([str(a) for a in ["--ckpt", run / "runs/x/last.pt", "--shards", run / "shards/val-*.tar",
                                         "--num", 1, "--steps", 1, "--device", "cpu", "--out_dir", shards]]) == 0
    assert all(any(p.match(n) for n in module.written_names(False)) for p in shards.iterdir())


@pytest.mark.parametrize("target, what", [
    ("manifest.json", "is an input of this command"),
    ("val-000000.tar", "is an input of this command"),
    ("../runs/x/last.pt", "is a checkpoint"),
])
def test_inspect_never_writes_its_sheet_over_what_it_reads(run, capsys, target, what):
    path = run / "shards" / target
    before = digest(path)
    rc = inspect_main([str(run / "shards"), "--out", str(path)])
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: --out {path} ") and what in err, err
    assert out == "" and digest(path) == before


def test_checkpoints_are_known_by_their_content(tmp_path):
    """torch.save's zip (even cut short) and its legacy pickle format, under any name; not other zips."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(64)}, buffer)
    legacy = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, legacy, _use_new_zipfile_serialization=False)
    cases = {"cut.json": buffer.getvalue()[:200], "legacy.png": legacy.getvalue(), "whole.npy": buffer.getvalue()}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert "is a checkpoint" in output_problem(tmp_path / name), name
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))  # a zip archive, but no torch file
    (tmp_path / "empty.json").write_bytes(b"")
    assert output_problem(tmp_path / "arrays.npz") is None and output_problem(tmp_path / "empty.json") is None
