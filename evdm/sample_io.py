"""The files of sample.py: endpoint images or shard clips in, sampled clips (evdm.denoiser) and pictures out. Size,
T, context and colour mode come from the checkpoint's config. Clips leave as uint8 [T, H, W, C] whose first K_start
and last K_end frames are the input frames byte for byte."""

import itertools
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from evdm import visualize
from evdm.atomic import atomic_write, folder_problem
from evdm.config import Context, RunConfig
from evdm.data.loader import read_clips
from evdm.data.shardset import ShardSet, expected_clip_shape
from evdm.denoiser import Denoiser
from evdm.seeds import mix_seed


class SamplingError(RuntimeError):
    """A user-facing problem with the inputs; the message names the file and what is wrong."""


def open_image(path: str | Path, color_mode: str) -> Image.Image:
    """Any image PIL reads, upright (EXIF orientation applied), in 8-bit RGB or L; SamplingError names the file."""
    try:
        with Image.open(path) as img:
            return eight_bit(ImageOps.exif_transpose(img), path).convert("RGB" if color_mode == "rgb" else "L")
    except FileNotFoundError:
        raise SamplingError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise SamplingError(f"{path}: not a readable image ({err})") from None


def eight_bit(img: Image.Image, path: str | Path) -> Image.Image:
    """`img` in a mode whose RGB/L conversion keeps its brightness (16-bit grey scaled to 8 bits: docs/GUIDE.md,
    Design notes); SamplingError for pixels with no known white level. Other modes convert correctly as they are."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
        wide = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")  # round(v * 255 / 65535)
    if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "floating-point"
        raise SamplingError(f"{path}: {kind} pixels (mode {img.mode}) have no known white level; "
                            f"save the frame as an 8- or 16-bit image")
    if img.mode == "P" and "transparency" in img.info:
        return img.convert("RGBA")  # PIL warns when per-entry palette alpha goes straight to RGB or L
    return img


def to_array(img: Image.Image, size: int) -> np.ndarray:
    """uint8 [size, size, C] (C = 3 rgb, 1 gray): the largest centred square, resized (bicubic)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = img.crop((left, top, left + side, top + side))
    arr = np.asarray(square.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0), dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def load_endpoints(start_paths: list[str], end_paths: list[str], cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """The K_start start and K_end end images -> (start, end) uint8 [K_*, H, W, C] at the model's size and mode."""
    for flag, paths, K, end in (("--start_images", start_paths, cfg.context.start, "start"),
                                ("--end_images", end_paths, cfg.context.end, "end")):
        if len(paths) != K:
            raise SamplingError(f"{flag}: got {len(paths)} image(s) ({' '.join(map(str, paths))}), "
                                f"but the checkpoint observes {K} frame(s) at the {end} (data.context)")
    images = {p: open_image(p, cfg.data.color_mode) for p in [*start_paths, *end_paths]}
    # Frames of one clip share a camera: different sizes are different shots or crops (Design notes).
    if len({img.size for img in images.values()}) > 1:
        listed = ", ".join(f"{p} {img.size[0]}x{img.size[1]}" for p, img in images.items())
        raise SamplingError(f"start and end images must all have the same size: {listed}")
    load = lambda p: to_array(images[p], cfg.data.size)  # noqa: E731
    return np.stack([load(p) for p in start_paths]), np.stack([load(p) for p in end_paths])


def iter_shard_clips(shards: str | list[str], cfg: RunConfig, num: int) -> Iterator[tuple[str, np.ndarray]]:
    """Stream the first `num` (key, uint8 [T, H, W, C]) clips of the shards in sorted order (a damaged shard
    is skipped with one warning, as the trainer does). ConfigError when the clips are not what the checkpoint
    was trained on; SamplingError when the shards hold no clip."""
    shard_set = ShardSet.open(shards, "--shards")
    shard_set.check(cfg, needed_by="the checkpoint", frame_stride=False)  # sampling other strides is the user's call
    count = 0
    for count, (key, clip) in enumerate(read_clips(shard_set, expected_clip_shape(cfg), num), 1):
        yield key, clip
    if count == 0:
        raise SamplingError(f"{shards}: the shards hold no clips")


def batched(items: Iterable, n: int) -> Iterator[list]:
    """Consecutive lists of up to n items."""
    items = iter(items)
    while batch := list(itertools.islice(items, n)):
        yield batch


def write_clip_outputs(out_dir: Path, name: str, clip: np.ndarray, K: Context,
                       truth: np.ndarray | None = None) -> list[Path]:
    """{name}.mp4, {name}.png (strip), {name}.npy; with truth also {name}_truth.mp4/.png and {name}_compare.png.
    clip, truth: uint8 [T, H, W, C]. Returns the paths written."""
    scale, s = visualize.video_scale(clip.shape[1]), visualize.strip_scale(clip.shape[1])
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.npy"]
    visualize.save_png(visualize.frame_strip(clip, K, scale=s), paths[0])
    atomic_write(paths[1], lambda tmp: np.save(tmp, clip), keep_extension=True)  # np.save wants a .npy name
    if truth is not None:
        extra = [out_dir / f"{name}_truth.png", out_dir / f"{name}_compare.png"]
        visualize.save_png(visualize.frame_strip(truth, K, scale=s, middle_color=visualize.TRUTH_COLOR), extra[0])
        visualize.save_png(visualize.comparison_strip(truth, clip, K, scale=s), extra[1])
        paths += extra
    # MP4s last and optional: without a working ffmpeg they are skipped with one warning.
    for video, frames in ((f"{name}.mp4", clip), (f"{name}_truth.mp4", truth)):
        if frames is not None and visualize.try_save_video(frames, out_dir / video, fps=visualize.FPS, scale=scale):
            paths.append(out_dir / video)
    return paths


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[clips]} clips"), TimeElapsedColumn())


def sample_to_files(jobs: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]], total: int,
                    denoiser: Denoiser, cfg: RunConfig, out_dir: str | Path, *, seed: int = 0, batch_size: int = 16,
                    keep_arrays: bool = True) -> list[dict]:
    """Sample every job (name, start uint8 [K_start, H, W, C], end uint8 [K_end, H, W, C], truth [T, H, W, C] or
    None; `total` of them) with cfg.sample's settings, writing its outputs and grid_{i:03d}.gif per batch. Returns
    one dict per clip: name, paths and, with keep_arrays, sample (uint8 [T, H, W, C]) and truth."""
    out_dir = Path(out_dir)
    if problem := folder_problem(out_dir):
        raise SamplingError(f"--out_dir {out_dir} {problem}")
    sc, K = cfg.sample, cfg.context
    results = []
    with progress_bar() as progress:
        task = progress.add_task(f"{sc.sampler}-{sc.steps}", total=-(-total // batch_size), clips=0)
        for index, batch in enumerate(batched(jobs, batch_size)):
            generator = torch.Generator(device=denoiser.device).manual_seed(mix_seed(seed, index))
            starts, ends = (np.stack([job[i] for job in batch]) for i in (1, 2))
            samples = denoiser.generate_u8(starts, ends, sc, generator=generator)
            for (name, _, _, truth), sample in zip(batch, samples):
                paths = write_clip_outputs(out_dir, name, sample, K, truth)
                arrays = dict(sample=sample, truth=truth) if keep_arrays else {}
                results.append(dict(name=name, paths=paths, **arrays))
            grid = visualize.batch_grid_frames(samples, K, scale=visualize.strip_scale(cfg.data.size))
            visualize.save_gif(grid, out_dir / f"grid_{index:03d}.gif", fps=visualize.FPS)
            progress.update(task, advance=1, clips=len(results))
    return results


def image_jobs(start: np.ndarray, end: np.ndarray, num_samples: int) -> list[tuple]:
    """`num_samples` jobs sharing the endpoints start [K_start, H, W, C], end [K_end, H, W, C] uint8."""
    return [(f"sample_{i:03d}", start, end, None) for i in range(num_samples)]


def shard_jobs(shards: str | list[str], cfg: RunConfig, num: int, num_samples: int = 1) -> Iterator[tuple]:
    """Streamed jobs from shard clips, each sampled `num_samples` times; the clip is the truth."""
    for key, clip in iter_shard_clips(shards, cfg, num):
        clip = np.array(clip)  # own the bytes: the shard view is read-only
        start, _, end = cfg.context.split(clip, axis=0)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip(".") or "clip"
        for i in range(num_samples):
            yield (name + (f"_s{i}" if num_samples > 1 else ""), start, end, clip)
