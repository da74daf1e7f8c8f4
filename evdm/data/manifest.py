"""manifest.json, which preprocess writes beside the shards after the last one, as one type. Torch-free. The format
is in docs/ARCHITECTURE.md ("Data"); "bytes", "sources", "source_fps" and "scan" absent (earlier versions) are None."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from evdm.atomic import atomic_write
from evdm.config import ConfigError
from evdm.data.schema import MANIFEST_NAME

FORMAT = 1


@dataclass(frozen=True)
class ShardEntry:
    """One shard file: its name in the shard folder, its clips, its sha256 and size (None: not recorded)."""

    name: str
    clips: int
    sha256: str | None = None
    bytes: int | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class Split:
    """A split's videos, clips and shards, in shard order."""

    videos: int
    clips: int
    shards: tuple[ShardEntry, ...] = ()

    def as_dict(self) -> dict:
        return {"videos": self.videos, "clips": self.clips, "shards": [s.as_dict() for s in self.shards]}


@dataclass(frozen=True)
class Manifest:
    """manifest.json as written by preprocess (see the module doc)."""

    options: dict
    clip_shape: tuple[int, ...]
    splits: dict[str, Split]
    skipped: list[dict] = field(default_factory=list)
    sources: list[dict] | None = None  # per usable video
    source_fps: dict[str, int] | None = None  # histogram of the sources' frame rates
    scan: dict | None = None  # what the scan found and left out
    dtype: str = "uint8"

    def shards(self) -> list[ShardEntry]:
        """Every split's shards, in the manifest's order."""
        return [s for split in self.splits.values() for s in split.shards]

    def entry(self, name: str) -> ShardEntry | None:
        """The shard called `name` (a file name in the shard folder), or None."""
        return next((s for s in self.shards() if s.name == name), None)

    def as_dict(self) -> dict:
        optional = {key: getattr(self, key) for key in ("sources", "source_fps", "scan")}
        return {"format": FORMAT, "options": self.options, "clip_shape": list(self.clip_shape), "dtype": self.dtype,
                "splits": {k: v.as_dict() for k, v in self.splits.items()}, "skipped": self.skipped,
                **{key: value for key, value in optional.items() if value is not None}}

    def write(self, folder: str | Path) -> Path:
        """folder/manifest.json, atomically (temporary name, fsync, rename)."""
        path = Path(folder) / MANIFEST_NAME
        text = json.dumps(self.as_dict(), indent=2, sort_keys=True)
        atomic_write(path, lambda tmp: tmp.write_text(text), fsync=True)
        return path

    @classmethod
    def from_dict(cls, raw: dict, where: str = "<manifest>") -> Manifest:
        """A Manifest from parsed JSON; ConfigError naming `where` and what is wrong."""
        try:
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT}")
            splits = {name: Split(videos=int(s.get("videos", 0)), clips=int(s["clips"]),
                                  shards=tuple(ShardEntry(name=e["name"], clips=int(e["clips"]),
                                                          sha256=e.get("sha256"), bytes=e.get("bytes"))
                                               for e in s.get("shards", [])))
                      for name, s in raw["splits"].items()}
            return cls(options=dict(raw.get("options", {})), clip_shape=tuple(raw["clip_shape"]), splits=splits,
                       skipped=list(raw.get("skipped", [])), sources=raw.get("sources"),
                       source_fps=raw.get("source_fps"), scan=raw.get("scan"), dtype=raw.get("dtype", "uint8"))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"{where}: not an evdm shard manifest ({type(err).__name__}: {err})") from None

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        """The manifest at `path` (manifest.json, or the folder holding it); ConfigError naming the file."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no manifest.json (not a shard folder written by preprocess?)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: unreadable manifest ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: not an evdm shard manifest (a JSON {type(raw).__name__})")
        return cls.from_dict(raw, str(path))
