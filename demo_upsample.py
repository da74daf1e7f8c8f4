"""`python demo.py --task upsample`: 4x frame-rate up-conversion of whole held-out videos, scored against the truth.

The synthetic generator renders any instant, so a held-out (val) video rendered at 29 frames is the truth and
its every 4th frame, 8 frames, the input. Each method turns the 8 frames into 29: evdm (configs/upsample4x.toml,
trained on the demo's videos; `evdm.upconvert`, the code behind `sample.py --video`), the linear blend, and
ffmpeg minterpolate (its blend and the best of its mci grid by PSNR, `evdm.peer`). The generated frames (3 of
every 4) are scored against the truth with evaluate's metrics (PSNR, SSIM, HF ratio), and each whole video's
flicker against the truth's, overall, across window boundaries (the pairs touching a shared input frame) and
within windows. (bench/real_footage.py scores real footage clip by clip, with evdm.evaluate.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from evdm import peer
from evdm.atomic import atomic_write
from evdm.denoiser import Denoiser, resolve_device
from evdm.diffusion import linear_blend
from evdm.ffmpeg import write_mp4
from evdm.metrics import flicker, hf_ratio, psnr, ssim, u8_to_unit
from evdm.upconvert import factor_of, upconvert_array
from evdm.visualize import save_png
from preprocess.synth import SYNTH_FPS, render_video, video_seed

FACTOR = 4
INPUT_FRAMES = 8
HELD_OUT_VIDEOS = 8
PANEL_SCALE = 4  # the side-by-side video enlarges each 32 px panel to 128 px (nearest)
LABEL_PX = 14


def held_out_truth(motion: str, size: int, videos: int, seed: int = 0) -> np.ndarray:
    """uint8 [V, (INPUT_FRAMES - 1) x FACTOR + 1, H, W, 3]: the demo's first val videos (never trained on), the
    same scenes rendered at FACTOR times the input's frame rate."""
    frames = (INPUT_FRAMES - 1) * FACTOR + 1
    return np.stack([render_video(video_seed(seed, "val", i), frames, size, motion) for i in range(videos)])


def blend_video(frames: np.ndarray, factor: int) -> np.ndarray:
    """The linear blend between consecutive frames uint8 [F, H, W, C] -> [(F - 1) x factor + 1, H, W, C]:
    evaluate's "linear blend" row (`evdm.diffusion.linear_blend`) on every window, rounded to uint8."""
    ends = torch.from_numpy(frames).permute(0, 3, 1, 2).unsqueeze(2).float()  # [F, C, 1, H, W]
    middles = linear_blend(ends[:-1], ends[1:], factor - 1).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
    steps = np.concatenate([frames[:-1, None], middles], axis=1).reshape(-1, *frames.shape[1:])
    return np.concatenate([steps, frames[-1:]])


def held_video(frames: np.ndarray, factor: int) -> np.ndarray:
    """The input at the output's rate, each frame held until the next: what a player shows."""
    return np.concatenate([np.repeat(frames[:-1], factor, axis=0), frames[-1:]])


def output_frames(frames: int, factor: int) -> int:
    """Output frames of F input frames at `factor` times the rate: (F - 1) x N + 1 (0 for none)."""
    return (frames - 1) * factor + 1 if frames else 0


def boundary_pairs(frames: int, factor: int) -> np.ndarray:
    """bool [(F - 1) x N]: the output pairs (k, k + 1) touching an input frame 1 .. F - 2 (two windows share it)."""
    k = np.arange(output_frames(frames, factor) - 1)
    shared = lambda pos: (pos % factor == 0) & (pos > 0) & (pos < (frames - 1) * factor)  # noqa: E731
    return shared(k) | shared(k + 1)


def within_pairs(frames: int, factor: int) -> np.ndarray:
    """bool [(F - 1) x N]: the consecutive output pairs of two generated frames of one window."""
    k = np.arange(output_frames(frames, factor) - 1)
    return (k % factor != 0) & ((k + 1) % factor != 0)


def window_flicker(video: np.ndarray, truth: np.ndarray, factor: int) -> dict[str, float | None]:
    """evdm.metrics.flicker of an up-converted video against the truth, uint8 [(F - 1) x N + 1, H, W, C]
    each: over all consecutive pairs, over the pairs across window boundaries and over those within
    windows (None where there are none: N = 2 has no pair of two generated frames)."""
    F = (len(video) - 1) // factor + 1
    x, y = (u8_to_unit(torch.from_numpy(np.ascontiguousarray(v))).permute(0, 3, 1, 2) for v in (video, truth))
    masks = {"overall": None, "boundary": torch.from_numpy(boundary_pairs(F, factor)),
             "within": torch.from_numpy(within_pairs(F, factor))}
    return {name: None if mask is not None and not mask.any() else round(float(flicker(x, y, mask)), 4)
            for name, mask in masks.items()}


def score(videos: np.ndarray, truth: np.ndarray, factor: int) -> dict:
    """PSNR, SSIM and HF ratio over the generated frames, flicker over whole videos: uint8 [V, T, H, W, C] each."""
    generated = np.arange(truth.shape[1]) % factor != 0
    x, y = (u8_to_unit(torch.from_numpy(v[:, generated])).permute(0, 1, 4, 2, 3) for v in (videos, truth))
    flick = [window_flicker(v, t, factor) for v, t in zip(videos, truth)]
    mean = lambda key: round(float(np.mean([f[key] for f in flick])), 4)  # noqa: E731
    return {"psnr": round(float(psnr(x, y).mean()), 3), "ssim": round(float(ssim(x, y).mean()), 4),
            "hf_ratio": round(float(hf_ratio(x, y).mean()), 3),
            "flicker": mean("overall"), "flicker_boundary": mean("boundary"), "flicker_within": mean("within")}


def interpolate_video(frames: np.ndarray, factor: int, setting) -> np.ndarray:
    """ffmpeg minterpolate at `setting` (evdm.peer.Setting) over a video uint8 [F, H, W, C] at `factor` times its
    frame rate, one pass as a user runs it: uint8 [(F - 1) x factor + 1, H, W, C], input frame i at i x factor."""
    out = (len(frames) - 1) * factor + 1
    graph = f"[0:v]minterpolate=fps={factor}:{setting.options()},trim=end_frame={out}[out]"
    return peer.run_graph(np.concatenate([frames, frames[-1:]]), graph, out)


def minterpolate_videos(inputs: np.ndarray, factor: int) -> dict[str, np.ndarray]:
    """ffmpeg minterpolate's blend and every setting of its mci grid: {setting name: [V, T, H, W, C]}."""
    settings = [peer.BLEND, *peer.mci_grid(inputs.shape[2])]
    return {s.name: np.stack([interpolate_video(v, factor, s) for v in inputs]) for s in settings}


def label_band(names: list[str], width: int) -> np.ndarray:
    """uint8 [LABEL_PX, len(names) x width, 3]: each name over its panel."""
    band = Image.new("RGB", (len(names) * width, LABEL_PX), (24, 24, 24))
    draw = ImageDraw.Draw(band)
    for i, name in enumerate(names):
        draw.text((i * width + 3, 1), name, fill=(235, 235, 235))
    return np.asarray(band)


def side_by_side(panels: dict[str, np.ndarray]) -> np.ndarray:
    """uint8 [V x T, LABEL_PX + H x s, P x W x s, 3]: the videos one after another, the panels side by side."""
    names, videos = list(panels), np.stack(list(panels.values()), axis=2)  # [V, T, P, H, W, C]
    big = videos.repeat(PANEL_SCALE, axis=-3).repeat(PANEL_SCALE, axis=-2)
    V, T, P, H, W, C = big.shape
    rows = big.transpose(0, 1, 3, 2, 4, 5).reshape(V * T, H, P * W, C)
    band = np.broadcast_to(label_band(names, W), (V * T, LABEL_PX, P * W, C))
    return np.concatenate([band, rows], axis=1)


def run(ckpt: str | Path, out: Path, motion: str, size: int) -> dict:
    """Up-convert the held-out videos with every method, score them, write OUT/upsample.json and
    OUT/upsample_side_by_side.mp4 (and its middle frame as a PNG); returns the result."""
    truth = held_out_truth(motion, size, HELD_OUT_VIDEOS)
    inputs = truth[:, ::FACTOR]
    denoiser = Denoiser.load(ckpt, resolve_device(None))
    if factor_of(denoiser.cfg) != FACTOR:
        raise ValueError(f"{ckpt}: a {factor_of(denoiser.cfg)}x model, the demo needs {FACTOR}x")
    evdm = np.stack([upconvert_array(v, denoiser, denoiser.cfg.sample, seed=i) for i, v in enumerate(inputs)])
    peers = minterpolate_videos(inputs, FACTOR)
    peer_scores = {name: score(v, truth, FACTOR) for name, v in peers.items()}
    best_peer = max((n for n in peers if "mci" in n), key=lambda n: peer_scores[n]["psnr"])
    blend = np.stack([blend_video(v, FACTOR) for v in inputs])
    rows = {"linear blend": score(blend, truth, FACTOR), "ffmpeg minterpolate blend": peer_scores[
        "ffmpeg minterpolate blend"], best_peer: peer_scores[best_peer],
            f"evdm ({denoiser.cfg.sample.steps} DDIM steps)": score(evdm, truth, FACTOR)}
    result = {"checkpoint": str(ckpt), "videos": len(truth), "input_frames": INPUT_FRAMES, "factor": FACTOR,
              "size": size, "motion": motion, "rows": rows, "minterpolate_grid": peer_scores,
              "scored": "PSNR, SSIM, HF ratio: the generated frames (3 of every 4) against the truth; flicker: the "
                        "mean change between consecutive frames over the truth's, per video"}
    atomic_write(out / "upsample.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    panels = {"input (held)": np.stack([held_video(v, FACTOR) for v in inputs]), "linear blend": blend,
              "minterpolate": peers[best_peer], "evdm": evdm, "truth": truth}
    movie = side_by_side(panels)
    write_mp4(movie, out / "upsample_side_by_side.mp4", fps=SYNTH_FPS, crf=12)
    middle = len(movie) // 2
    save_png(movie[middle + (middle % truth.shape[1] % FACTOR == 0)], out / "upsample_side_by_side.png")  # generated
    return result


def print_table(result: dict) -> None:
    table = Table(title=f"{result['factor']}x up-conversion of {result['videos']} held-out videos "
                        f"({result['input_frames']} -> {(result['input_frames'] - 1) * result['factor'] + 1} frames)")
    for column in ("method", "PSNR dB", "SSIM", "HF ratio", "flicker", "at boundaries", "within windows"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, r in result["rows"].items():
        table.add_row(name, f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", f"{r['hf_ratio']:.2f}", f"{r['flicker']:.3f}",
                      f"{r['flicker_boundary']:.3f}", f"{r['flicker_within']:.3f}")
    Console(width=120).print(table)
