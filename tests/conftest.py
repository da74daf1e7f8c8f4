"""Shared test setup: CPU only (tests marked `gpu` skip without CUDA), few threads, no bf16 conv backward
(it can hang on AMX CPUs).

And the shared fixtures' makers (STYLE 8: tiny synthetic data written here): clips, shards with or
without manifest.json, the tiny model config and a checkpoint trained for a few steps. Test modules
import the makers by name (`from conftest import ...`: pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` need CUDA: without it each is skipped with that reason, before any fixture runs."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (a `gpu` test); torch.cuda.is_available() is False here")
        for item in gpu:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything():
    import random

    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:
        pass


# ---- clips and shards ---------------------------------------------------------------------------


def random_clips(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> list[np.ndarray]:
    """n uint8 clips of `shape` [T, H, W, C], uniform noise."""
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def moving_square(rng: np.random.Generator, T: int, size: int, channels: int = 3) -> np.ndarray:
    """uint8 [T, size, size, C]: a 5 px square of one colour moving at constant speed over a grey floor."""
    clip = np.full((T, size, size, channels), 60, np.uint8)
    x, y = rng.integers(0, size - 6, size=2)
    dx, dy = rng.choice([-1, 1], size=2)
    color = rng.integers(100, 255, size=channels)
    for f in range(T):
        cx, cy = np.clip([x + dx * f, y + dy * f], 0, size - 5)
        clip[f, cy:cy + 5, cx:cx + 5] = color
    return clip


def write_shards(shard_dir: Path, clips: dict[str, list[list[np.ndarray]]], *, manifest: bool = True) -> dict[bytes, str]:
    """One {split}-NNNNNN.tar per list of clips (uint8 [T, H, W, C]; keys {split}{shard}_{i}, meta {"i": i}),
    and manifest.json (counts, sha256s, clip shape) unless `manifest=False`. Returns {clip bytes: shard name}."""
    from evdm.data.schema import encode_sample
    from preprocess.writer import split_entries, write_manifest, write_shard

    shard_dir.mkdir(parents=True, exist_ok=True)
    owner, records = {}, []
    for split, shards in clips.items():
        for s, shard in enumerate(shards):
            name = f"{split}-{s:06d}.tar"
            count, sha = write_shard(shard_dir / name,
                                     [encode_sample(f"{split}{s}_{i}", c, {"i": i}) for i, c in enumerate(shard)])
            records.append({"name": name, "split": split, "videos": 1, "clips": count, "sha256": sha})
            owner.update({c.tobytes(): name for c in shard})
    if manifest:
        shape = next(c.shape for shards in clips.values() for shard in shards for c in shard)
        write_manifest(shard_dir, options={"frame_stride": 1}, clip_shape=shape, splits=split_entries(records),
                       skipped=[])
    return owner


def write_square_shards(shard_dir: Path, *, T: int, size: int, train_shards: int, per_shard: int,
                        val_shards: int = 1, channels: int = 3, seed: int = 0, manifest: bool = True) -> str:
    """Moving-square shards (train-*, val-*; a split of 0 shards is left out); returns the val glob."""
    rng = np.random.default_rng(seed)
    splits = {split: [[moving_square(rng, T, size, channels) for _ in range(per_shard)] for _ in range(n)]
              for split, n in (("train", train_shards), ("val", val_shards)) if n}
    write_shards(shard_dir, splits, manifest=manifest)
    return str(shard_dir / "val-*.tar")


def clip_bytes(batch) -> list[bytes]:
    """[B, C, T, H, W] -> per-sample bytes in the shards' [T, H, W, C] layout (to match write_shards' owners)."""
    return [b.permute(1, 2, 3, 0).contiguous().numpy().tobytes() for b in batch]


def train_loader(cfg, **kwargs):
    """evdm.data.loader.make_train_loader over cfg's data.train_shards (opened as the trainer opens them)."""
    from evdm.data.loader import make_train_loader
    from evdm.data.shardset import ShardSet

    return make_train_loader(cfg, ShardSet.open(cfg.data.train_shards, "data.train_shards"), **kwargs)


def val_clips(cfg):
    """evdm.data.loader.load_val_clips over cfg's data.val_shards."""
    from evdm.data.loader import load_val_clips
    from evdm.data.shardset import ShardSet

    return load_val_clips(ShardSet.open(cfg.data.val_shards, "data.val_shards"), cfg)


def take(loader, n: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(n)]


# ---- a tiny model and checkpoint ------------------------------------------------------------------

# The sampling / evaluation tests' clip geometry: T frames of SIZE px, K context frames at each end.
SIZE, T, K = 16, 6, 2


def tiny_config(color_mode: str = "rgb", **diffusion):
    """The sampling / evaluation tests' model: 16 px, T 6, context (2, 2), 50 timesteps; trains at lr 1e-3
    with no warm-up and an EMA that follows the weights (decay 0), so a few steps change its output."""
    from evdm.config import Context, DataConfig, DiffusionConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig

    return RunConfig(
        data=DataConfig(size=SIZE, T=T, context=Context(K, K), color_mode=color_mode),
        model=ModelConfig(base_channels=8, channel_mults=(1, 2), res_blocks=1, temporal_attn_levels=(1,),
                          attn_head_channels=8),
        diffusion=DiffusionConfig(timesteps=50, cfg_drop_prob=0.2, **diffusion),
        train=TrainConfig(device="cpu", batch_size=4, lr=1e-3, lr_warmup_steps=0, ema_decay=0.0),
        sample=SampleConfig(steps=3, guidance_scale=1.5),
    )


def square_batches(cfg, seed: int = 0):
    """An endless iterator of uint8 [B, C, T, H, W] batches of moving squares at cfg's geometry."""
    import torch

    rng = np.random.default_rng(seed)
    while True:
        u8 = np.stack([moving_square(rng, cfg.data.T, cfg.data.size, cfg.channels) for _ in range(cfg.train.batch_size)])
        yield torch.from_numpy(u8).permute(0, 4, 1, 2, 3)


def make_checkpoint(path: Path, color_mode: str = "rgb", train_steps: int = 3, **diffusion) -> Path:
    """A tiny model trained for a few steps of the real training step on moving squares, saved with
    evdm.checkpoint (its EMA follows the weights: decay 0)."""
    import torch

    from evdm.checkpoint import make_payload, save_checkpoint
    from evdm.train import make_trainer, train_step

    cfg = tiny_config(color_mode, **diffusion)
    trainer = make_trainer(cfg, torch.device("cpu"))
    batches = square_batches(cfg)
    for step in range(train_steps):
        train_step(trainer, batches, step)
    save_checkpoint(path, make_payload(step=train_steps, cfg=cfg, model=trainer.denoiser.net, ema=trainer.ema.net,
                                       optimizer=trainer.optimizer, scaler=trainer.scaler))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny rgb checkpoint (tiny_config), trained 3 steps."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "last.pt")


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> str:
    """Glob of 2 val shards of 3 moving-square clips each at tiny_config's geometry, no manifest."""
    return write_square_shards(tmp_path_factory.mktemp("shards"), T=T, size=SIZE, train_shards=0, per_shard=3,
                               val_shards=2, seed=1, manifest=False)


# ---- tiny training runs (test_train, test_lifecycle, test_damaged) ---------------------------------

TRAIN_T, TRAIN_SIZE = 8, 16  # configs/smoke.toml's T at 16 px


def make_train_shards(shard_dir: Path, train_shards: int = 4, per_shard: int = 8) -> None:
    """Moving-square train shards and one val shard for configs/smoke.toml at TRAIN_SIZE, with manifest.json."""
    write_square_shards(shard_dir, T=TRAIN_T, size=TRAIN_SIZE, train_shards=train_shards, per_shard=per_shard)


def tiny_overrides(shard_dir: Path, out_dir: Path, **extra) -> list[str]:
    """--set values that shrink configs/smoke.toml to seconds on a CPU; `extra`: more, as TOML text."""
    values = {
        "data.train_shards": f'"{shard_dir}/train-*.tar"', "data.val_shards": f'"{shard_dir}/val-*.tar"',
        "data.size": TRAIN_SIZE, "data.num_workers": 0, "data.val_clips": 4,
        "model.base_channels": 8, "model.attn_head_channels": 8,
        "train.out_dir": f'"{out_dir}"', "train.batch_size": 2, "train.max_steps": 6, "train.log_every": 2,
        "train.val_every": 3, "train.ckpt_every": 3, "train.snapshot_every": 6, "train.preview_clips": 2,
        "train.preview_steps": 2, "train.lr_warmup_steps": 2, "train.ema_decay": 0.9,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def load_tiny(shard_dir: Path, out_dir: Path, **extra):
    from evdm.config import load_config

    return load_config(ROOT / "configs" / "smoke.toml", tiny_overrides(shard_dir, out_dir, **extra))


def set_args(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def run_cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """python3 ARGS in the repository root, one thread, output captured as text."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """make_train_shards: 4 train shards of 8 clips and 1 val shard."""
    path = tmp_path_factory.mktemp("shards")
    make_train_shards(path)
    return path


def signal_during_step(monkeypatch, stop_step: int, sig: int) -> None:
    """A real signal `sig` that the run sends itself during the training step ending at `stop_step`
    (evdm.train.loop.train_step patched): the stop lands at a known step, without a timed kill."""
    from evdm.train import loop

    train_step = loop.train_step

    def signalling_step(trainer, batches, step, **kwargs):
        if step == stop_step - 1:
            os.kill(os.getpid(), sig)
        return train_step(trainer, batches, step, **kwargs)

    monkeypatch.setattr(loop, "train_step", signalling_step)


def frame_at(img: np.ndarray, row: int, col: int, h: int, w: int, *, scale: int = 4, border: int = 2,
             gap: int = 2) -> np.ndarray:
    """The [h, w, 3] frame drawn at cell (row, col) of a `grid` picture (inverse of the layout)."""
    from evdm import visualize

    y, x = visualize.cell_origin(row, col, h, w, scale=scale, border=border, gap=gap)
    return img[y : y + h * scale : scale, x : x + w * scale : scale]
