"""`python -m preprocess.inspect SHARD_DIR [--verify]`: print the manifest summary, save a contact sheet PNG.

The sheet shows a few random clips, one per row, frames left to right, so a person can see what the
shards hold (crop, colour, motion) before training on them. `--verify` instead checks every shard's
sha256 against manifest.json and names each one missing or changed (exit 1 if any).
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from evdm.atomic import output_problem
from evdm.data.manifest import Manifest
from evdm.data.schema import CLIP_EXT, MANIFEST_NAME, META_EXT, decode_clip, decode_meta
from preprocess.progress import Progress
from preprocess.writer import sha256_file


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k or '(no extension)'} {n}" for k, n in counts.items())


def scan_lines(scan: dict) -> list[str]:
    """What the scan found and left out (the manifest's "scan"), as lines; nothing left out gives one line."""
    lines = [f"scan: {scan['videos_used']} of {scan['videos_found']} video files used"]
    if scan.get("not_videos"):
        lines.append(f"  {sum(scan['not_videos'].values())} files that are not videos skipped "
                     f"({_counts(scan['not_videos'])})")
    missing = scan.get("listed_missing", [])
    if missing:
        more = f" ... and {len(missing) - 5} more (see {MANIFEST_NAME})" if len(missing) > 5 else ""
        lines.append(f"  {len(missing)} names in the split lists match no video: {', '.join(missing[:5])}{more}")
    if scan.get("unlisted"):
        lines.append(f"  {scan['unlisted']} videos named by no split list left out")
    if scan.get("over_max_videos"):
        lines.append(f"  {scan['over_max_videos']} videos left out by --max-videos")
    return lines


def rate_line(histogram: dict[str, int], fps: float | None) -> str:
    """The source frame rates as "source fps: 25 x3, 50 x1", and what they were resampled to."""
    order = sorted(histogram, key=lambda k: (k == "unknown", float(k) if k != "unknown" else 0.0))
    rates = ", ".join(f"{k} x{histogram[k]}" for k in order)
    kept = f"resampled to {fps:g} fps" if fps else "kept (no --fps)"
    return f"source fps (videos per rate): {rates}; {kept}"


def geometry_lines(sources: list[dict]) -> list[str]:
    """How many videos were turned upright or had non-square pixels corrected (none: no line)."""
    turned = sum(s["rotation"] != 0 for s in sources)
    stretched = sum(s["sar"] != "1:1" for s in sources)
    return [f"upright and unstretched: {turned} videos turned by their rotation metadata, "
            f"{stretched} with non-square pixels corrected"] if turned or stretched else []


def summary_lines(manifest: Manifest) -> list[str]:
    """The manifest as a few human-readable lines (what older manifests lack is left out)."""
    opts = ", ".join(f"{k}={v}" for k, v in sorted(manifest.options.items()))
    lines = [f"clip shape {list(manifest.clip_shape)} {manifest.dtype}; options: {opts}"]
    for split, entry in manifest.splits.items():
        lines.append(f"{split}: {entry.videos} videos, {entry.clips} clips, {len(entry.shards)} shards")
    if manifest.scan is not None:
        lines += scan_lines(manifest.scan)
    if manifest.source_fps is not None:
        lines.append(rate_line(manifest.source_fps, manifest.options.get("fps")))
        lines += geometry_lines(manifest.sources)
    skipped = manifest.skipped
    lines.append(f"skipped: {len(skipped)} videos")
    lines += [f"  {s['path']}: {s['reason']}" for s in skipped[:20]]
    if len(skipped) > 20:
        lines.append(f"  ... and {len(skipped) - 20} more (see {MANIFEST_NAME})")
    return lines


def verify(shard_dir: Path, manifest: Manifest, *, quiet: bool = False) -> list[str]:
    """"name: what is wrong" for each shard the manifest lists that is missing or whose sha256 differs."""
    shards = manifest.shards()
    problems = []
    with Progress("shards", len(shards), counts={"MB": 0.0}, quiet=quiet) as progress:
        for shard in shards:
            path = shard_dir / shard.name
            if not path.is_file():
                problems.append(f"{shard.name}: missing")
            elif (digest := sha256_file(path)) != shard.sha256:
                problems.append(f"{shard.name}: sha256 {digest[:16]}... differs from the manifest's "
                                f"{shard.sha256[:16]}... (damaged or replaced since it was written)")
            progress.advance(MB=path.stat().st_size / 1e6 if path.is_file() else 0.0)
    return problems


def read_samples(tar_path: Path, keys: set[str] | None = None) -> dict[str, dict]:
    """{key: {"clip": uint8 [T, H, W, C], "meta": dict}} for the samples of one shard (or some keys)."""
    out: dict[str, dict] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if keys is not None and key not in keys:
                continue
            data = tar.extractfile(member).read()
            if ext == CLIP_EXT:
                out.setdefault(key, {})["clip"] = decode_clip(data)
            elif ext == META_EXT:
                out.setdefault(key, {})["meta"] = decode_meta(data)
    return out


def contact_sheet(clips: list[np.ndarray], scale: int = 2, gap: int = 2) -> Image.Image:
    """clips: uint8 [T, H, W, C] each -> one image, a row per clip, frames left to right."""
    T, H, W, C = clips[0].shape
    sheet = np.full((len(clips) * (H + gap) - gap, T * (W + gap) - gap, 3), 255, np.uint8)
    for r, clip in enumerate(clips):
        rgb = clip if C == 3 else np.repeat(clip, 3, axis=-1)
        for t in range(T):
            sheet[r * (H + gap):r * (H + gap) + H, t * (W + gap):t * (W + gap) + W] = rgb[t]
    image = Image.fromarray(sheet)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m preprocess.inspect", description=__doc__.splitlines()[0])
    p.add_argument("shard_dir", type=Path, metavar="SHARD_DIR")
    p.add_argument("--clips", type=int, default=8, help="clips on the sheet (default 8)")
    p.add_argument("--split", default="train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="PNG path (default SHARD_DIR/contact_sheet.png)")
    p.add_argument("--verify", action="store_true",
                   help="check every shard's sha256 against manifest.json (exit 1 if any is missing or changed)")
    args = p.parse_args(argv)
    try:
        manifest = Manifest.read(args.shard_dir)
        out = args.out or args.shard_dir / "contact_sheet.png"
        inputs = [args.shard_dir / MANIFEST_NAME, *(args.shard_dir / s.name for s in manifest.shards())]
        if not args.verify and (problem := output_problem(out, inputs=inputs)):
            print(f"error: --out {out} {problem}", file=sys.stderr)
            return 2
        print("\n".join(summary_lines(manifest)))
        if args.verify:
            problems = verify(args.shard_dir, manifest)
            print("\n".join(problems + [f"verified {len(manifest.shards())} shards: {len(problems)} missing or changed"]))
            return 1 if problems else 0
        split = manifest.splits.get(args.split)
        shards = [s.name for s in split.shards] if split else []
        if not shards:
            print(f"no {args.split} shards to show")
            return 0
        rng = np.random.default_rng(args.seed)
        # A few random clips from one random shard: reading one tar keeps this fast on big datasets.
        shard = shards[rng.integers(len(shards))]
        samples = read_samples(args.shard_dir / shard)
        keys = sorted(samples)
        chosen = [keys[i] for i in sorted(rng.choice(len(keys), min(args.clips, len(keys)), replace=False))]
        contact_sheet([samples[k]["clip"] for k in chosen]).save(out)
    except (OSError, KeyError, ValueError, tarfile.TarError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"contact sheet of {len(chosen)} clips from {shard} -> {out}")
    for k in chosen:
        m = samples[k]["meta"]
        print(f"  {m['source']} @ frame {m['start_frame']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
