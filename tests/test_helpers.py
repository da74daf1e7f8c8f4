"""Small shared helpers: seed mixing (golden values from before it was shared) and atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from evdm.atomic import atomic_write
from evdm.seeds import mix_seed, step_seed


def test_step_seed_golden_values():
    # Computed with the inline formula ((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63 it replaced.
    cases = [(0, 0, 0), (0, 1, 0), (0, 0, 1), (1234, 3, 98765), (2**40, 7, 10**9), (-5, 2, 3)]
    expected = [0, 1000003, 1, 1234007407109880, 44342205443578325, 9223367036826775772]
    assert [step_seed(*c) for c in cases] == expected


@pytest.mark.parametrize("seed, index", [(0, 0), (0, 5), (7, 0), (1234, 99), (-3, 2)])
def test_batch_seed_matches_the_old_inline_formula(seed, index):
    assert mix_seed(seed, index) == seed * 1_000_003 + index  # sampling.py and evaluate.py used this


def test_atomic_write_keeps_the_old_file_when_write_raises(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail, fsync=True)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


@pytest.mark.parametrize("keep_extension, tmp_name", [(False, "loss.png.tmp"), (True, "loss.png.tmp.png")])
def test_atomic_write_replaces_via_a_temporary_beside_the_file(tmp_path, keep_extension, tmp_name):
    seen = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"new")

    atomic_write(tmp_path / "loss.png", write, fsync=True, keep_extension=keep_extension)
    assert seen == [tmp_path / tmp_name] and (tmp_path / "loss.png").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]
