"""The whole evdm loop on the built-in synthetic dataset, sized for a 2-core CPU (a few minutes):

    python demo.py [OUT_DIR] [--motion glide|orbit]       (default runs/demo, glide)

1. render BAIR-like videos (preprocess.synth)     -> OUT_DIR/data/videos_{train,val}/
2. shard them (preprocess.shard)                  -> OUT_DIR/shards/
3. train configs/demo.toml (train.py)             -> OUT_DIR/run/ (last.pt, metrics, loss.png, previews/)
4. evaluate against the baselines (evdm.evaluate) -> OUT_DIR/eval.json
5. fill in val clips (sample.py)                  -> OUT_DIR/samples/

Each stage is the same command a user would run by hand; rerunning resumes the sharding and
retrains from scratch. --motion picks the synthetic motion (preprocess.synth): eased straight moves
(glide) or accelerating turns with objects passing behind one another (orbit).
bench/recipes.py runs the same stages for its recipe study.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SIZE = 32
VIDEOS = 300
EVAL_STEPS = [10]  # DDIM step counts scored besides MAIN_STEPS
MAIN_STEPS = 1  # the summary row (see configs/demo.toml: one step is the posterior-mean estimate PSNR rewards)
SAMPLE_CLIPS = 8
CONFIG = "configs/demo.toml"


def stage(title: str, run, args: list[str]) -> None:
    """Run one stage's entry point; prints its wall time and this process's CPU time (all its threads:
    on a shared machine the CPU seconds say what the stage costs, the wall seconds what the load made of it)."""
    print(f"\n=== {title}: {' '.join(args)}", flush=True)
    start, cpu = time.perf_counter(), time.process_time()
    rc = run(args)
    if rc:
        sys.exit(f"demo: stage '{title}' failed (exit {rc})")
    print(f"=== {title}: done in {time.perf_counter() - start:.0f} s (CPU {time.process_time() - cpu:.0f} s)", flush=True)


def make_shards(out: Path, motion: str = "glide", seed: int = 0) -> Path:
    """Stages 1-2: render the synthetic videos of `motion` (seed `seed`) and shard them; returns the shard folder."""
    from preprocess import shard, synth

    data, shards = out / "data", out / "shards"
    stage("synthetic videos", synth.main, [str(data), "--videos", str(VIDEOS), "--size", str(SIZE),
                                           "--motion", motion, "--seed", str(seed)])
    # Clip windows every 2 frames: more (overlapping) training clips from the same 300 videos.
    stage("shards", shard.main, [str(data), str(shards), "--size", str(SIZE), "--clip-stride", "2",
                                 "--shard-size", "200"])
    return shards


def train_model(run: Path, shards: Path, overrides: dict[str, str] | None = None) -> Path:
    """Stage 3: train configs/demo.toml on `shards` into `run` (from scratch), with extra `--set`
    overrides {key: TOML value}; returns the checkpoint."""
    import train

    settings = {"train.out_dir": f'"{run}"', "data.train_shards": f'"{shards / "train-*.tar"}"',
                "data.val_shards": f'"{shards / "val-*.tar"}"', **(overrides or {})}
    stage("train", train.main, [CONFIG, "--overwrite"] + [a for k, v in settings.items() for a in ("--set", f"{k}={v}")])
    return run / "last.pt"


def val_clips(shards: Path) -> int:
    """How many val clips the shard folder's manifest lists."""
    return json.loads((shards / "manifest.json").read_text())["splits"]["val"]["clips"]


def evaluate_model(ckpt: Path, shards: Path, eval_json: Path, guidance: float | None = None,
                   clips: int | None = None) -> dict:
    """Stage 4: the model against the baselines on the first `clips` val clips (default: all of them);
    returns evaluate's result (as written to `eval_json`)."""
    from evdm import evaluate

    args = ["--ckpt", str(ckpt), "--shards", str(shards / "val-*.tar"), "--num", str(clips or val_clips(shards)),
            "--steps", *map(str, EVAL_STEPS), "--main_steps", str(MAIN_STEPS), "--json", str(eval_json)]
    stage("evaluate", evaluate.main, args + ([] if guidance is None else ["--guidance_scale", str(guidance)]))
    return json.loads(eval_json.read_text())


def main(argv: list[str] | None = None) -> int:
    from preprocess.synth import MOTIONS

    parser = argparse.ArgumentParser(prog="python demo.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default="runs/demo", type=Path)
    parser.add_argument("--motion", choices=MOTIONS, default="glide")
    args = parser.parse_args(argv)
    import sample

    out, begin = args.out_dir, time.perf_counter()
    shards = make_shards(out, args.motion)
    ckpt, eval_json, samples = train_model(out / "run", shards), out / "eval.json", out / "samples"
    result = evaluate_model(ckpt, shards, eval_json)
    s = result["summary"]
    stage("sample", sample.main, ["--ckpt", str(ckpt), "--shards", str(shards / "val-*.tar"), "--num",
                                  str(SAMPLE_CLIPS), "--out_dir", str(samples)])

    psnr_base, ssim_base, d = s["best_baseline_psnr"], s["best_baseline_ssim"], s["sampled"]
    print(f"\nevdm demo ({args.motion}) finished in {time.perf_counter() - begin:.0f} s. On {result['clips']} val clips, "
          f"the best baselines: {psnr_base['psnr']:.2f} dB ({psnr_base['method']}), SSIM {ssim_base['ssim']:.4f} "
          f"({ssim_base['method']}). The samples ({d['model']}): {d['psnr']:.2f} dB, SSIM {d['ssim']:.4f}, margin "
          f"{d['model_minus_best_baseline_db']:+.2f} dB, {d['model_minus_best_baseline_ssim']:+.4f} SSIM, "
          f"{d['hf_ratio']:.2f} of the truth's high-frequency energy; the posterior mean ({s['model']}): "
          f"{s['model_psnr']:.2f} dB, SSIM {s['model_ssim']:.4f}, margin {s['model_minus_best_baseline_db']:+.2f} dB, "
          f"{s['model_minus_best_baseline_ssim']:+.4f} SSIM, {s['model_hf_ratio']:.2f} of the high-frequency energy.")
    print(f"  checkpoint      {ckpt}\n  training logs   {out / 'run'}/metrics.jsonl, {out / 'run'}/loss.png\n"
          f"  previews        {out / 'run'}/previews/\n  evaluation      {eval_json}\n"
          f"  samples         {samples}/ (*.mp4, *.png strips, *_compare.png, grid_*.gif)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
