"""The whole evdm loop on the built-in synthetic dataset, sized for a 2-core CPU (a few minutes):

    python demo.py [OUT_DIR] [--motion glide|orbit]       (default runs/demo, glide)
    python demo.py [OUT_DIR] --task upsample               (default runs/demo-upsample)

1. render BAIR-like videos (preprocess.synth)     -> OUT_DIR/data/videos_{train,val}/
2. shard them (preprocess.shard)                  -> OUT_DIR/shards/
3. train configs/demo.toml (train.py)             -> OUT_DIR/run/ (last.pt, metrics, loss.png, previews/)
4. evaluate against the baselines (evdm.evaluate) -> OUT_DIR/eval.json
5. fill in val clips (sample.py)                  -> OUT_DIR/samples/

--task upsample trains configs/upsample4x.toml (one observed frame at each end, 3 generated: 4x the frame
rate) on 5-frame clips of the same videos, then up-converts whole held-out videos from a quarter of their
rate and scores evdm, the linear blend and ffmpeg minterpolate against the truth (demo_upsample.py) ->
OUT_DIR/upsample.json and OUT_DIR/upsample_side_by_side.mp4 (input held, blend, minterpolate, evdm, truth).

Each stage calls the library function behind the command a user would run by hand (preprocess.synth,
preprocess.shard, train, evdm.evaluate, sample.py's writer); rerunning resumes the sharding and
retrains from scratch. Ctrl-C or SIGTERM during the training stops the demo there, as train.py
stops, with last.pt saved and exit 0 (a line says how to continue). --motion picks the synthetic motion (preprocess.synth): eased straight moves
(glide) or accelerating turns with objects passing behind one another (orbit).
bench/recipes.py runs the same stages for its recipe study.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

SIZE = 32
VIDEOS = 300
EVAL_STEPS = [10]  # DDIM step counts scored besides MAIN_STEPS
MAIN_STEPS = 1  # the summary row (see configs/demo.toml: one step is the posterior-mean estimate PSNR rewards)
SAMPLE_CLIPS = 8
CONFIG = "configs/demo.toml"
UPSAMPLE_CONFIG = "configs/upsample4x.toml"


def stage(title: str, fn: Callable[..., T], *args, **kwargs) -> T:
    """Run one stage (a library call) and return its result; prints its wall time and this process's CPU
    time (all its threads: on a shared machine the CPU seconds say what the stage costs, the wall
    seconds what the load made of it)."""
    print(f"\n=== {title}", flush=True)
    start, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    print(f"=== {title}: done in {time.perf_counter() - start:.0f} s (CPU {time.process_time() - cpu:.0f} s)", flush=True)
    return result


def make_shards(out: Path, motion: str = "glide", seed: int = 0, T: int = 8) -> Path:
    """Stages 1-2: render the synthetic videos of `motion` (seed `seed`) and shard them in clips of T frames
    (resumable); returns the shard folder."""
    from rich.console import Console

    from preprocess import shard, synth

    data, shards = out / "data", out / "shards"
    stage("synthetic videos", synth.generate, data, videos=VIDEOS, size=SIZE, motion=motion, seed=seed)
    # Clip windows every 2 frames: more (overlapping) training clips from the same 300 videos.
    opts = shard.Options(size=SIZE, T=T, clip_stride=2, shard_size=200)
    summary = stage("shards", shard.run, data, shards, opts, workers=os.cpu_count() or 1, show_progress=True)
    shard.print_summary(Console(), summary, shards, opts)
    return shards


def train_model(run: Path, shards: Path, overrides: dict[str, str] | None = None, config: str = CONFIG) -> Path:
    """Stage 3: train `config` on `shards` into `run` (from scratch), with extra overrides {section.key: TOML
    value}; returns the checkpoint sample.py and evaluate take from the run folder (best.pt)."""
    from evdm.cli import run_checkpoint
    from evdm.config import load_config
    from evdm.train import train

    settings = {"train.out_dir": f'"{run}"', "data.train_shards": f'"{shards / "train-*.tar"}"',
                "data.val_shards": f'"{shards / "val-*.tar"}"', **(overrides or {})}
    cfg = load_config(config, [f"{key}={value}" for key, value in settings.items()])
    return Path(run_checkpoint(str(stage("train", train, cfg, overwrite=True))))


def evaluate_model(ckpt: Path, shards: Path, eval_json: Path, guidance: float | None = None,
                   clips: int | None = None) -> dict:
    """Stage 4: the model against the baselines on the first `clips` val clips (default: all of them);
    prints evaluate's table, writes its result to `eval_json` and returns it."""
    from evdm import evaluate
    from evdm.data.manifest import Manifest

    num = clips or Manifest.read(shards).splits["val"].clips
    result = stage("evaluate", evaluate.evaluate, ckpt, str(shards / "val-*.tar"), num=num, steps_list=EVAL_STEPS,
                   main_steps=MAIN_STEPS, guidance_scale=guidance)
    evaluate.print_table(result)
    evaluate.write_json(result, eval_json)
    print(f"wrote {eval_json}")
    return result


def sample_clips(ckpt: Path, shards: Path, out_dir: Path) -> None:
    """Stage 5: fill in the first SAMPLE_CLIPS val clips' middles and write them as sample.py does."""
    from evdm import sample_io
    from evdm.denoiser import Denoiser, resolve_device

    denoiser = Denoiser.load(ckpt, resolve_device(None))
    cfg = denoiser.cfg
    jobs = sample_io.shard_jobs(str(shards / "val-*.tar"), cfg, SAMPLE_CLIPS)
    written = stage("sample", sample_io.sample_to_files, jobs, SAMPLE_CLIPS, denoiser, cfg, out_dir, seed=0,
                    keep_arrays=False)
    print(f"wrote {len(written)} clip(s) to {out_dir}/")


def main(argv: list[str] | None = None) -> int:
    from preprocess.synth import MOTIONS

    parser = argparse.ArgumentParser(prog="python demo.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", type=Path, help="default: runs/demo, runs/demo-upsample")
    parser.add_argument("--motion", choices=MOTIONS, default="glide")
    parser.add_argument("--task", choices=("clip", "upsample"), default="clip",
                        help="clip: fill in 8-frame clips; upsample: 4x frame rate of whole videos")
    args = parser.parse_args(argv)
    args.out_dir = args.out_dir or Path("runs/demo" if args.task == "clip" else "runs/demo-upsample")
    from evdm.atomic import DiskFullError
    from evdm.checkpoint import CheckpointError
    from evdm.config import ConfigError
    from evdm.ffmpeg import FFmpegNotFound
    from evdm.preemption import stop_requested
    from evdm.sample_io import SamplingError
    from preprocess.options import UserError

    out, begin = args.out_dir, time.perf_counter()
    upsample = args.task == "upsample"
    try:
        shards = make_shards(out, args.motion, T=5 if upsample else 8)
        ckpt = train_model(out / "run", shards, config=UPSAMPLE_CONFIG if upsample else CONFIG)
        if stop_requested():  # the run saved last.pt and returned: the demo stops with it, as train.py does
            again = f"python demo.py {out} --motion {args.motion}" + (" --task upsample" if upsample else "")
            print(f"demo: stopped during the training, {ckpt.parent / 'last.pt'} saved. Continue the training with "
                  f"`python train.py {ckpt.parent / 'config.toml'} --resume`, or rerun `{again}` to start it over")
            return 0
        if upsample:
            import demo_upsample

            result = stage("up-convert and score", demo_upsample.run, ckpt, out, args.motion, SIZE)
            demo_upsample.print_table(result)
        else:
            result = evaluate_model(ckpt, shards, out / "eval.json")
            sample_clips(ckpt, shards, out / "samples")
    except (UserError, FFmpegNotFound, ConfigError, CheckpointError, SamplingError, DiskFullError, OSError) as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    print(f"\nevdm demo ({args.task}, {args.motion}) finished in {time.perf_counter() - begin:.0f} s.")
    if upsample:
        print(f"  checkpoint      {ckpt}\n  scores          {out}/upsample.json\n"
              f"  video           {out}/upsample_side_by_side.mp4 (input held, blend, minterpolate, evdm, truth)")
    else:
        print_clip_summary(result, ckpt, out)
    return 0


def print_clip_summary(result: dict, ckpt: Path, out: Path) -> None:
    s = result["summary"]
    psnr_base, ssim_base, d = s["best_baseline_psnr"], s["best_baseline_ssim"], s["sampled"]
    print(f"On {result['clips']} val clips, "
          f"the best baselines: {psnr_base['psnr']:.2f} dB ({psnr_base['method']}), SSIM {ssim_base['ssim']:.4f} "
          f"({ssim_base['method']}). The samples ({d['model']}): {d['psnr']:.2f} dB, SSIM {d['ssim']:.4f}, margin "
          f"{d['model_minus_best_baseline_db']:+.2f} dB, {d['model_minus_best_baseline_ssim']:+.4f} SSIM, "
          f"{d['hf_ratio']:.2f} of the truth's high-frequency energy; the posterior mean ({s['model']}): "
          f"{s['model_psnr']:.2f} dB, SSIM {s['model_ssim']:.4f}, margin {s['model_minus_best_baseline_db']:+.2f} dB, "
          f"{s['model_minus_best_baseline_ssim']:+.4f} SSIM, {s['model_hf_ratio']:.2f} of the high-frequency energy.")
    print(f"  checkpoint      {ckpt}\n  training logs   {out / 'run'}/metrics.jsonl, {out / 'run'}/loss.png\n"
          f"  previews        {out / 'run'}/previews/\n  evaluation      {out / 'eval.json'}\n"
          f"  samples         {out / 'samples'}/ (*.mp4, *.png strips, *_compare.png, grid_*.gif)")


if __name__ == "__main__":
    sys.exit(main())
