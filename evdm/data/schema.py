"""The shard sample format, shared by the preprocessors and the loaders. Torch-free.

A shard is a tar file; each sample is two members sharing one key:
  {key}.clip.npy   uint8 numpy array [T, H, W, C], C = 3 (rgb) or 1 (gray)
  {key}.meta.json  source path, start frame, frame stride, fps, split (+ extras)
"""

from __future__ import annotations

import io
import json
import re

import numpy as np

CLIP_EXT = "clip.npy"
META_EXT = "meta.json"
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "{split}-{index:06d}.tar"
COLOR_CHANNELS = {"rgb": 3, "gray": 1}


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


def encode_meta(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def decode_meta(data: bytes) -> dict:
    return json.loads(data)


def encode_sample(key: str, clip: np.ndarray, meta: dict) -> dict[str, bytes | str]:
    """One WebDataset sample: {"__key__", "clip.npy", "meta.json"}."""
    return {"__key__": key, CLIP_EXT: encode_clip(clip), META_EXT: encode_meta(meta)}


def clip_shape(T: int, size: int, color_mode: str) -> tuple[int, int, int, int]:
    """The [T, H, W, C] shape of a clip for these settings."""
    if color_mode not in COLOR_CHANNELS:
        raise ValueError(f"color_mode must be one of {sorted(COLOR_CHANNELS)}, got {color_mode!r}")
    return (T, size, size, COLOR_CHANNELS[color_mode])
