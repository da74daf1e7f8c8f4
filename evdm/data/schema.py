"""The shard format, shared by the preprocessors and the loaders: samples, shard names and shard lists.
Torch-free. A shard is a tar file; each sample is two members sharing one key:
  {key}.clip.npy   uint8 numpy array [T, H, W, C], C = 3 (rgb) or 1 (gray)
  {key}.meta.json  source path, start frame, frame stride, fps, split (+ extras)"""

import glob
import io
import json
import os
import re

import braceexpand
import numpy as np

from evdm.config import ConfigError

CLIP_EXT = "clip.npy"
META_EXT = "meta.json"
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "{split}-{index:06d}.tar"
COLOR_CHANNELS = {"rgb": 3, "gray": 1}
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


def make_key(relpath: str, start_frame: int) -> str:
    """Stable sample key from a source path and a start frame; no dots (WebDataset splits on them)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", relpath)
    return f"{stem}__f{start_frame:06d}"


def encode_clip(clip: np.ndarray) -> bytes:
    """uint8 [T, H, W, C] -> .npy bytes."""
    if clip.dtype != np.uint8 or clip.ndim != 4:
        raise ValueError(f"clip must be uint8 [T, H, W, C], got {clip.dtype} {clip.shape}")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(clip), allow_pickle=False)
    return buf.getvalue()


def decode_clip(data: bytes) -> np.ndarray:
    """.npy bytes -> uint8 [T, H, W, C] (a read-only view of `data`, no copy)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_meta(data: bytes) -> dict:
    return json.loads(data)


def encode_sample(key: str, clip: np.ndarray, meta: dict) -> dict[str, bytes | str]:
    """One WebDataset sample: {"__key__", "clip.npy", "meta.json"}."""
    return {"__key__": key, CLIP_EXT: encode_clip(clip),
            META_EXT: json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()}


def clip_shape(T: int, size: int, color_mode: str) -> tuple[int, int, int, int]:
    """The [T, H, W, C] shape of a clip for these settings (color_mode: checked by the config and the CLIs)."""
    return (T, size, size, COLOR_CHANNELS[color_mode])


def expand_urls(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Shard URLs from a glob, a brace pattern ("train-{000000..000009}.tar"), a list, or pipe: URLs. Local globs
    are sorted, a local pattern that matches nothing is a ConfigError naming it; remote URLs are brace-expanded only."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        for url in braceexpand.braceexpand(item):
            if url.startswith(REMOTE_PREFIXES):
                urls.append(url)
                continue
            if glob.has_magic(url):
                matched = sorted(glob.glob(url))
                if not matched:
                    raise ConfigError(f"shard pattern {url!r} matches no file")
                urls.extend(matched)
            elif os.path.isfile(url):
                urls.append(url)
            else:
                raise ConfigError(f"shard file {url!r} not found")
    if not urls:
        raise ConfigError(f"shard spec {spec!r} names no shard")
    return urls


def shard_slice(urls: list[str], rank: int, world_size: int, worker: int, num_workers: int, epoch: int, seed: int,
                *, shuffle: bool = True) -> list[str]:
    """The shards that (rank, worker) reads in pass `epoch`: the list permuted with (seed, epoch), the same on
    every rank, when `shuffle`, then dealt round-robin over the world_size * num_workers readers (each once)."""
    order = list(urls)
    if shuffle:
        perm = np.random.default_rng([seed, epoch]).permutation(len(order))
        order = [order[i] for i in perm]
    slot = rank * num_workers + worker
    return order[slot :: world_size * num_workers]
