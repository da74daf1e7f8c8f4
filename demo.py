"""The whole evdm loop on the built-in synthetic dataset, sized for a 2-core CPU (a few minutes):

    python demo.py [OUT_DIR]        (default runs/demo)

1. render BAIR-like videos (preprocess.synth)     -> OUT_DIR/data/videos_{train,val}/
2. shard them (preprocess.shard)                  -> OUT_DIR/shards/
3. train configs/demo.toml (train.py)             -> OUT_DIR/run/ (last.pt, metrics, loss.png, previews/)
4. evaluate against the baselines (evdm.evaluate) -> OUT_DIR/eval.json
5. fill in val clips (sample.py)                  -> OUT_DIR/samples/

Each stage is the same command a user would run by hand; rerunning resumes the sharding and
retrains from scratch.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

SIZE = 32
VIDEOS = 300
EVAL_CLIPS = 64
EVAL_STEPS = ["5", "10"]
SAMPLE_CLIPS = 8


def stage(title: str, run, args: list[str]) -> None:
    print(f"\n=== {title}: {' '.join(args)}", flush=True)
    start = time.perf_counter()
    rc = run(args)
    if rc:
        sys.exit(f"demo: stage '{title}' failed (exit {rc})")
    print(f"=== {title}: done in {time.perf_counter() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import sample
    import train
    from evdm import evaluate
    from preprocess import shard, synth

    out = Path(argv[0] if argv else "runs/demo")
    data, shards, run, samples = out / "data", out / "shards", out / "run", out / "samples"
    begin = time.perf_counter()
    stage("synthetic videos", synth.main, [str(data), "--videos", str(VIDEOS), "--size", str(SIZE)])
    # Clip windows every 2 frames: more (overlapping) training clips from the same 300 videos.
    stage("shards", shard.main, [str(data), str(shards), "--size", str(SIZE), "--clip-stride", "2",
                                 "--shard-size", "200"])
    overrides = {"train.out_dir": run, "data.train_shards": shards / "train-*.tar",
                 "data.val_shards": shards / "val-*.tar"}
    stage("train", train.main, ["configs/demo.toml"] + [a for k, v in overrides.items() for a in ("--set", f'{k}="{v}"')])
    ckpt, eval_json = run / "last.pt", out / "eval.json"
    stage("evaluate", evaluate.main, ["--ckpt", str(ckpt), "--shards", str(shards / "val-*.tar"), "--num",
                                      str(EVAL_CLIPS), "--steps", *EVAL_STEPS, "--json", str(eval_json)])
    stage("sample", sample.main, ["--ckpt", str(ckpt), "--shards", str(shards / "val-*.tar"), "--num",
                                  str(SAMPLE_CLIPS), "--out_dir", str(samples)])

    summary = json.loads(eval_json.read_text())["summary"]
    gain = summary["model_minus_linear_blend_db"]
    verdict = "beats" if gain > 0 else "does NOT beat"
    print(f"\nevdm demo finished in {time.perf_counter() - begin:.0f} s. On {EVAL_CLIPS} val clips the "
          f"{summary['model']} {verdict} the linear blend: {summary['model_psnr']:.2f} dB vs "
          f"{summary['linear_blend_psnr']:.2f} dB PSNR ({gain:+.2f} dB).")
    print(f"  checkpoint      {ckpt}\n  training logs   {run}/metrics.jsonl, {run}/loss.png\n"
          f"  previews        {run}/previews/\n  evaluation      {eval_json}\n"
          f"  samples         {samples}/ (*.mp4, *.png strips, *_compare.png, grid_*.gif)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
