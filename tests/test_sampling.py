"""sample.py and evdm.sample_io with a tiny checkpoint trained here: exact context frames, clear errors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import K, SIZE, T, frame_at, make_checkpoint, tiny_config, write_square_shards
from evdm import sample_io as sampling, visualize
from evdm.config import with_sample
from evdm.denoiser import Denoiser, to_uint8
from evdm.diffusion import linear_blend

ROOT = Path(__file__).resolve().parents[1]
SCALE = visualize.strip_scale(SIZE)  # PNG strip enlargement


def load_image(path, size: int, color_mode: str):
    """What sample.py reads from an endpoint image: uint8 [size, size, C], centre-cropped."""
    return sampling.to_array(sampling.open_image(path, color_mode), size)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four endpoint images of one (non-square) size in assorted formats and modes."""
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(2)
    paths = []
    kinds = [((30, 40, 3), "png"), ((30, 40, 3), "jpeg"), ((30, 40), "bmp"), ((30, 40, 4), "png")]
    for i, (shape, fmt) in enumerate(kinds):
        p = d / f"im{i}.{fmt}"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def sample_module():
    spec = importlib.util.spec_from_file_location("sample_entry", ROOT / "sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_main(args, capsys) -> tuple[int, str]:
    rc = sample_module().main([str(a) for a in args])
    return rc, capsys.readouterr().err


# ---- images -----------------------------------------------------------------------------------


def test_load_image_center_crops_and_converts(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 200  # the centred square; the side bars must be cropped away
    Image.fromarray(img).save(tmp_path / "wide.png")
    rgb = load_image(tmp_path / "wide.png", 16, "rgb")
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8 and (rgb == 200).all()
    gray = load_image(tmp_path / "wide.png", 8, "gray")
    assert gray.shape == (8, 8, 1)


def test_sampling_from_images_keeps_the_exact_context_frames(ckpt, images, tmp_path):
    den = Denoiser.load(ckpt, torch.device("cpu"))
    cfg = den.cfg
    start, end = sampling.load_endpoints(images[:2], images[2:], cfg)
    jobs = sampling.image_jobs(start, end, num_samples=3)
    results = sampling.sample_to_files(jobs, 3, den, with_sample(cfg, steps=2), tmp_path, batch_size=2)
    assert len(results) == 3 and (tmp_path / "grid_000.gif").is_file() and (tmp_path / "grid_001.gif").is_file()
    for r in results:
        assert r["sample"].shape == (T, SIZE, SIZE, 3)
        assert np.array_equal(r["sample"][:K], start) and np.array_equal(r["sample"][T - K :], end)
        for p in r["paths"]:
            assert p.stat().st_size > 0
        strip = np.asarray(Image.open(tmp_path / f"{r['name']}.png"))
        for t in range(T):
            assert np.array_equal(frame_at(strip, 0, t, SIZE, SIZE, scale=SCALE), r["sample"][t])
        assert np.array_equal(np.load(tmp_path / f"{r['name']}.npy"), r["sample"])


def test_sampler_output_round_trips_the_context_bytes(ckpt, val_shards):
    """Without generate_u8's final paste, float sampling + rounding already reproduces the input bytes."""
    den = Denoiser.load(ckpt, torch.device("cpu"))
    cfg = den.cfg
    clips = np.stack([c for _, c in sampling.iter_shard_clips(val_shards, cfg, 3)])
    x = den.to_input(torch.from_numpy(clips).permute(0, 4, 1, 2, 3))
    settings = with_sample(cfg, steps=2, eta=0.0, guidance_scale=1.8).sample
    u8 = to_uint8(den.generate(x[:, :, :K], x[:, :, T - K :], settings, generator=torch.Generator().manual_seed(0)))
    assert np.array_equal(u8[:, :K], clips[:, :K]) and np.array_equal(u8[:, T - K :], clips[:, T - K :])


def test_same_seed_same_samples(ckpt, images, tmp_path):
    den = Denoiser.load(ckpt, torch.device("cpu"))
    cfg = den.cfg
    start, end = sampling.load_endpoints(images[:2], images[2:], cfg)
    runs = [sampling.sample_to_files(sampling.image_jobs(start, end, 1), 1, den, with_sample(cfg, steps=2, eta=1.0),
                                     tmp_path / str(i), seed=seed)
            for i, seed in enumerate((0, 0, 1))]
    a, b, c = (r[0]["sample"] for r in runs)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_sample_py_from_images_subprocess(ckpt, images, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "sample.py"), "--ckpt", str(ckpt), "--start_images", *images[:2],
           "--end_images", *images[2:], "--out_dir", str(out), "--steps", "2", "--eta", "0.0",
           "--guidance_scale", "1.8", "--device", "cpu", "--seed", "0", "--num_samples", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr
    for name in ("sample_000", "sample_001"):
        assert (out / f"{name}.mp4").stat().st_size > 0
        strip = np.asarray(Image.open(out / f"{name}.png"))
        for t, path in zip([0, 1, T - 2, T - 1], images):
            expected = load_image(path, SIZE, "rgb")
            assert np.array_equal(frame_at(strip, 0, t, SIZE, SIZE, scale=SCALE), expected)
    assert (out / "grid_000.gif").is_file()


def test_residual_floor_flag_reaches_the_sampler(ckpt, images, tmp_path, capsys):
    """--residual_floor 255 (every change the model makes is below it): the middle frames are the blend."""
    start, end = (torch.from_numpy(np.stack([load_image(p, SIZE, "rgb") for p in pair])).permute(3, 0, 1, 2)[None]
                  .float() / 127.5 - 1 for pair in (images[:2], images[2:]))
    blend = to_uint8(linear_blend(start, end, T - 2 * K))[0]
    middles = {}
    for floor in ("0", "255"):
        rc, err = run_main(["--ckpt", ckpt, "--start_images", *images[:2], "--end_images", *images[2:], "--steps", 2,
                            "--residual_floor", floor, "--out_dir", tmp_path / floor, "--device", "cpu"], capsys)
        assert rc == 0, err
        strip = np.asarray(Image.open(tmp_path / floor / "sample_000.png"))
        middles[floor] = np.stack([frame_at(strip, 0, t, SIZE, SIZE, scale=SCALE) for t in range(K, T - K)])
    assert np.array_equal(middles["255"], blend) and not np.array_equal(middles["0"], blend)


# ---- shards -----------------------------------------------------------------------------------


def test_sampling_from_shards_writes_truth_and_keeps_context(ckpt, val_shards, tmp_path):
    den = Denoiser.load(ckpt, torch.device("cpu"))
    cfg = den.cfg
    jobs = sampling.shard_jobs(val_shards, cfg, num=4)
    results = sampling.sample_to_files(jobs, 4, den, with_sample(cfg, steps=2), tmp_path, batch_size=3)
    truths = [c for _, c in sampling.iter_shard_clips(val_shards, cfg, 4)]
    assert len(results) == 4
    for r, truth in zip(results, truths):
        assert np.array_equal(r["truth"], truth)
        assert np.array_equal(r["sample"][:K], truth[:K]) and np.array_equal(r["sample"][T - K :], truth[T - K :])
        compare = np.asarray(Image.open(tmp_path / f"{r['name']}_compare.png"))
        assert np.array_equal(frame_at(compare, 0, 2, SIZE, SIZE, scale=SCALE), truth[2])
        assert np.array_equal(frame_at(compare, 1, 2, SIZE, SIZE, scale=SCALE), r["sample"][2])
        assert (tmp_path / f"{r['name']}_truth.mp4").is_file() and (tmp_path / f"{r['name']}_truth.png").is_file()


def test_shard_clips_stream_lazily_and_skip_a_damaged_shard(ckpt, val_shards, tmp_path, capfd):
    """Reading stops after `num` clips: a broken later shard is never opened. Asked for more, the broken
    shard is skipped with one warning line, as the trainer skips one (evdm.data.loader)."""
    cfg = tiny_config()
    d = Path(val_shards).parent
    (tmp_path / "val-000000.tar").write_bytes((d / "val-000000.tar").read_bytes())
    (tmp_path / "val-000001.tar").write_bytes(b"garbage" * 100)
    pattern = str(tmp_path / "val-*.tar")
    assert len(list(sampling.iter_shard_clips(pattern, cfg, 3))) == 3
    assert "warning" not in capfd.readouterr().err
    assert len(list(sampling.iter_shard_clips(pattern, cfg, 5))) == 3
    (line,) = capfd.readouterr().err.strip().splitlines()
    assert line.startswith(f"warning: skipping shard {tmp_path / 'val-000001.tar'}: ") and line.endswith("(--shards)")


def test_sample_py_from_shards_in_process(ckpt, val_shards, tmp_path, capsys):
    rc, err = run_main(["--ckpt", ckpt, "--shards", val_shards, "--num", 2, "--batch_size", 2, "--steps", 2,
                        "--out_dir", tmp_path, "--device", "cpu"], capsys)
    assert rc == 0, err
    assert len(list(tmp_path.glob("*_compare.png"))) == 2


# ---- errors: one line, naming the file, exit 2 --------------------------------------------------


def test_wrong_number_of_images(ckpt, images, tmp_path, capsys):
    rc, err = run_main(["--ckpt", ckpt, "--start_images", images[0], "--end_images", *images[2:],
                        "--out_dir", tmp_path, "--device", "cpu"], capsys)
    assert rc == 2 and "--start_images: got 1 image" in err and "observes 2 frame(s) at the start (data.context)" in err and err.count("\n") == 1


def test_unreadable_and_missing_image(ckpt, images, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    rc, err = run_main(["--ckpt", ckpt, "--start_images", images[0], bad, "--end_images", *images[2:],
                        "--out_dir", tmp_path, "--device", "cpu"], capsys)
    assert rc == 2 and str(bad) in err and "not a readable image" in err and err.count("\n") == 1
    rc, err = run_main(["--ckpt", ckpt, "--start_images", *images[:2], "--end_images", images[2], tmp_path / "nope.png",
                        "--out_dir", tmp_path, "--device", "cpu"], capsys)
    assert rc == 2 and "nope.png: image not found" in err


def test_missing_and_corrupt_checkpoint(images, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00" * 64)
    text = tmp_path / "notes.pt"
    text.write_text("hello, this is not a checkpoint\n")
    for path, words in ((tmp_path / "missing.pt", "not found"), (corrupt, "not a PyTorch/evdm checkpoint file"),
                        (text, "not a PyTorch/evdm checkpoint file")):
        rc, err = run_main(["--ckpt", path, "--start_images", *images[:2], "--end_images", *images[2:],
                            "--out_dir", tmp_path, "--device", "cpu"], capsys)
        assert rc == 2 and str(path) in err and words in err and err.count("\n") == 1


def test_checkpoint_of_another_color_mode(ckpt, images, tmp_path, capsys):
    rc, err = run_main(["--ckpt", ckpt, "--color_mode", "gray", "--start_images", *images[:2],
                        "--end_images", *images[2:], "--out_dir", tmp_path, "--device", "cpu"], capsys)
    assert rc == 2 and str(ckpt) in err and "'rgb'" in err and "'gray'" in err
    gray_shards = write_square_shards(tmp_path / "gray", T=T, size=SIZE, train_shards=0, val_shards=1, per_shard=2,
                                      channels=1, manifest=False)
    rc, err = run_main(["--ckpt", ckpt, "--shards", gray_shards, "--num", 2, "--out_dir", tmp_path / "o",
                        "--device", "cpu"], capsys)
    assert rc == 2 and "val-000000.tar" in err and "'gray'" in err and "'rgb'" in err and err.count("\n") == 1


def test_gray_checkpoint_samples_gray(tmp_path, images):
    gray_ckpt = make_checkpoint(tmp_path / "gray.pt", color_mode="gray", train_steps=1)
    den = Denoiser.load(gray_ckpt, torch.device("cpu"), color_mode="gray")
    cfg = den.cfg
    start, end = sampling.load_endpoints(images[:2], images[2:], cfg)
    (r,) = sampling.sample_to_files(sampling.image_jobs(start, end, 1), 1, den, with_sample(cfg, steps=2),
                                    tmp_path / "out")
    assert r["sample"].shape == (T, SIZE, SIZE, 1) and np.array_equal(r["sample"][:K], start)


def test_flag_errors(ckpt, images, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        sample_module().main(["--ckpt", str(ckpt), "--out_dir", str(tmp_path)])
    assert exc.value.code == 2
    rc, err = run_main(["--ckpt", ckpt, "--start_images", *images[:2], "--end_images", *images[2:],
                        "--steps", 500, "--out_dir", tmp_path, "--device", "cpu"], capsys)
    assert rc == 2 and "--steps 500" in err


def test_start_and_end_images_of_different_sizes_are_refused(ckpt, images, tmp_path, capsys):
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(small)
    rc, err = run_main(["--ckpt", ckpt, "--start_images", *images[:2], "--end_images", images[2], small,
                        "--out_dir", tmp_path / "out", "--device", "cpu"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert f"{images[0]} 40x30" in err and f"{small} 16x16" in err
    assert not (tmp_path / "out").exists()


def test_out_dir_that_is_a_file_is_one_line(ckpt, images, tmp_path, capsys):
    taken = tmp_path / "samples"
    taken.write_text("not a folder")
    rc, err = run_main(["--ckpt", ckpt, "--start_images", *images[:2], "--end_images", *images[2:],
                        "--out_dir", taken, "--steps", 2, "--device", "cpu"], capsys)
    assert rc == 2 and err.count("\n") == 1 and f"--out_dir {taken} exists and is not a folder" in err
    assert taken.read_text() == "not a folder"


def test_out_dir_is_checked_before_the_checkpoint_is_read(images, tmp_path, capsys):
    taken = tmp_path / "samples"
    taken.write_text("not a folder")
    rc, err = run_main(["--ckpt", tmp_path / "missing.pt", "--start_images", *images[:2], "--end_images", *images[2:],
                        "--out_dir", taken, "--device", "cpu"], capsys)
    assert rc == 2 and err.count("\n") == 1 and f"--out_dir {taken} exists and is not a folder" in err
