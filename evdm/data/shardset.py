"""A shard list and the manifest beside its first local shard, each read once: what the trainer, sample.py
and evaluate know of the shards before reading a clip (shape, missing shards, clip count, sha256s, identity)."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from evdm.config import ConfigError, RunConfig
from evdm.data.manifest import Manifest, ShardEntry
from evdm.data.schema import COLOR_CHANNELS, MANIFEST_NAME, REMOTE_PREFIXES, clip_shape, expand_urls
from evdm.data.tar import DAMAGE, damage_reason, peek_clip_shape


def expected_clip_shape(cfg: RunConfig) -> tuple[int, int, int, int]:
    """The [T, H, W, C] shape of cfg's clips."""
    return clip_shape(cfg.data.T, cfg.data.size, cfg.data.color_mode)


def shape_problem(where: str, found: tuple, cfg: RunConfig, needed_by: str) -> str:
    """The one-line error for clips of shape `found` at `where`: their colour mode if C differs, else their shape."""
    expected = expected_clip_shape(cfg)
    modes = {c: m for m, c in COLOR_CHANNELS.items()}
    if len(found) == 4 and found[-1] != expected[-1]:
        return (f"{where}: clips are {modes.get(found[-1], found[-1])!r} (C={found[-1]}), but {needed_by} "
                f"needs {cfg.data.color_mode!r} clips")
    return (f"{where}: shard clips have shape [T, H, W, C] = {list(found)}, but data.T={cfg.data.T}, "
            f"data.size={cfg.data.size}, data.color_mode={cfg.data.color_mode!r} ({needed_by}) expect {list(expected)}")


@dataclass(frozen=True)
class ShardSet:
    """The shards `key` (e.g. "data.train_shards") names: urls in order, and the manifest beside them, if any."""

    key: str
    spec: str | list[str]
    urls: list[str]
    manifest: Manifest | None
    folder: Path | None  # where manifest.json is

    @classmethod
    def open(cls, spec: str | list[str], key: str) -> ShardSet:
        """Expand `spec` and read its manifest; ConfigError naming `key` when the pattern names no shard."""
        try:
            urls = expand_urls(spec)
        except ConfigError as err:
            raise ConfigError(f"{key}: {err}") from None
        first = urls[0]
        folder = None if first.startswith(REMOTE_PREFIXES) else Path(first).parent
        has_manifest = folder is not None and (folder / MANIFEST_NAME).is_file()
        return cls(key=key, spec=spec, urls=urls, manifest=Manifest.read(folder) if has_manifest else None,
                   folder=folder if has_manifest else None)

    def check(self, cfg: RunConfig, needed_by: str | None = None, *, frame_stride: bool = True) -> None:
        """ConfigError unless the clips have cfg's shape (per the manifest, else the first readable shard) and
        (frame_stride) the manifest's frame stride is data.frame_stride; needed_by names who needs it."""
        if self.manifest is not None:
            where, found = str(self.folder / MANIFEST_NAME), tuple(self.manifest.clip_shape)
            stride = self.manifest.options.get("frame_stride")
            if frame_stride and stride is not None and stride != cfg.data.frame_stride:
                raise ConfigError(f"{where}: shards made with frame_stride={stride}, "
                                  f"data.frame_stride={cfg.data.frame_stride}")
        else:
            where, found = self._peek_first_readable()
        if found != expected_clip_shape(cfg):
            raise ConfigError(shape_problem(where, found, cfg, needed_by or self.key))

    def _peek_first_readable(self) -> tuple[str, tuple[int, ...]]:
        """(url, clip shape) of the first shard that can be read; damaged ones are the readers' to skip and name."""
        reasons = []
        for url in self.urls:
            try:
                return url, tuple(peek_clip_shape(url))
            except DAMAGE as err:
                reasons.append(f"{url}: {damage_reason(url, err)}")
        raise ConfigError(f"{self.key}: no shard can be read (e.g. {reasons[0]})")

    def _entry(self, url: str) -> ShardEntry | None:
        return self.manifest.entry(Path(url).name) if self.manifest is not None else None

    def listed(self) -> list[ShardEntry]:
        """The manifest's shards that the local patterns of the spec name, whether or not the files exist."""
        if self.manifest is None:
            return []
        items = [self.spec] if isinstance(self.spec, str) else list(self.spec)
        patterns = [os.path.normpath(u) for item in items for u in braceexpand.braceexpand(item)
                    if not u.startswith(REMOTE_PREFIXES)]
        return [s for s in self.manifest.shards()
                if any(fnmatch.fnmatchcase(os.path.normpath(self.folder / s.name), p) for p in patterns)]

    def problems(self) -> list[str]:
        """"name (what is wrong)" for each listed shard that is missing, empty or of another size than recorded."""
        problems = []
        for entry in self.listed():
            path = self.folder / entry.name
            if not path.is_file():
                problems.append(f"{entry.name} (missing)")
            elif (size := path.stat().st_size) == 0 or (entry.bytes is not None and entry.bytes != size):
                want = f", manifest says {entry.bytes}" if entry.bytes is not None else ""
                problems.append(f"{entry.name} ({size} bytes{want})")
        return problems

    def clip_count(self) -> int | None:
        """Clips in the set per the manifest (None when unknown: remote shards, no manifest)."""
        return sum(e.clips for e in map(self._entry, self.urls) if e is not None) or None

    def digests(self) -> dict[str, str]:
        """url -> the manifest's sha256, for data.verify_shards; ConfigError when there is no manifest."""
        if self.manifest is None:
            raise ConfigError(f"data.verify_shards = true needs manifest.json beside {self.urls[0]} "
                              "(local shards only)")
        return {u: e.sha256 for u in self.urls if (e := self._entry(u)) is not None and e.sha256}

    def identity(self) -> str:
        """A short sha256 naming the list for --resume: of each shard's manifest entry (name, clips, sha256)
        in order, or of the urls when there is no manifest. Re-sharding or another pattern changes it."""
        items: list = self.urls
        if self.manifest is not None:
            items = [[Path(u).name, *((e.clips, e.sha256) if (e := self._entry(u)) else (None, None))]
                     for u in self.urls]
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def open_checked(cfg: RunConfig) -> tuple[ShardSet, ShardSet]:
    """(data.train_shards, data.val_shards), each opened and checked against cfg: the trainer's start."""
    train = ShardSet.open(cfg.data.train_shards, "data.train_shards")
    val = ShardSet.open(cfg.data.val_shards, "data.val_shards")
    for shards in (train, val):
        shards.check(cfg)
    return train, val
