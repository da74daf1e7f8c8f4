"""Fill in the middle of clips with a trained checkpoint (EMA weights by default; a run folder: its best.pt).

    python sample.py --ckpt out --start_images s0.png s1.png --end_images e0.png e1.png \
        --out_dir out/samples --steps 40 --eta 0.0 --guidance_scale 1.8 [--residual_floor 4] [--seed 0] \
        [--num_samples N]
    python sample.py --ckpt out --shards 'shards/val-*.tar' --num 64 --batch_size 16 --out_dir out/samples
    python sample.py --ckpt out --video in.mp4 --out out.mp4 [--batch_size 16] [--steps 10]

Per clip: an MP4, a PNG strip (context frames framed blue, generated orange) and the uint8 .npy;
from shards also the truth and a truth/sample comparison strip; per batch a grid GIF. --video: the
whole video at N times its frame rate with a checkpoint of context (1, 1) and T = N + 1 (evdm.upconvert:
every input frame kept, N - 1 frames generated between each pair, the sound copied; OUT.mkv is
lossless). Exit 2 on bad input (one line, the output path checked first); exit 1, one line, when the
disk fills up.
"""

import argparse
import sys

from evdm.atomic import DiskFullError, output_problem
from evdm.cli import add_checkpoint_flag, add_speed_flags, input_files, one_line


def written_names(from_images: bool) -> tuple[str, ...]:
    """Glob patterns of the files written into --out_dir (evdm.sample_io): per clip NAME.png, .npy and .mp4
    (from shards also NAME_truth.png/.mp4 and NAME_compare.png), NAME sample_NNN for images and the clip's
    key for shards; per batch grid_NNN.gif."""
    stem = "sample_*" if from_images else "*"
    return (f"{stem}.png", f"{stem}.npy", f"{stem}.mp4", "grid_*.gif")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flag(p)
    p.add_argument("--start_images", nargs="+", metavar="IMG", help="the K first frames")
    p.add_argument("--end_images", nargs="+", metavar="IMG", help="the K last frames")
    p.add_argument("--shards", help="shard glob/brace pattern: take contexts (and truth) from its clips")
    p.add_argument("--num", type=int, default=64, help="clips to read from --shards")
    p.add_argument("--video", metavar="IN", help="up-convert this video (checkpoint context (1, 1), T = N + 1)")
    p.add_argument("--out", metavar="OUT.mp4", help="with --video: the output video (.mkv: lossless FFV1)")
    p.add_argument("--out_dir", default="samples")
    p.add_argument("--steps", type=int, help="sampler steps (default: the checkpoint's sample.steps)")
    p.add_argument("--eta", type=float, help="DDIM eta (default: the checkpoint's)")
    p.add_argument("--guidance_scale", type=float, help="classifier-free guidance (default: the checkpoint's)")
    p.add_argument("--residual_floor", type=float, metavar="LEVELS",
                   help="keep the model's change to the linear blend only above this many gray levels, 0: off "
                        "(default: the checkpoint's sample.residual_floor)")
    p.add_argument("--device", help="cuda | cpu | cuda:N (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=int, default=1, help="samples per endpoint set / shard clip")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--color_mode", choices=("rgb", "gray"), help="fail unless the checkpoint is of this mode")
    add_speed_flags(p)
    args = p.parse_args(argv)
    from_images = args.start_images is not None or args.end_images is not None
    if from_images + (args.shards is not None) + (args.video is not None) != 1:
        p.error("give one of: --start_images and --end_images, --shards, --video")
    if from_images and not (args.start_images and args.end_images):
        p.error("--start_images and --end_images go together")
    if (args.video is None) != (args.out is None):
        p.error("--video and --out go together")
    if min(args.num, args.num_samples, args.batch_size) < 1:
        p.error("--num, --num_samples and --batch_size must be >= 1")
    inputs = input_files(args.ckpt, args.video, *(args.start_images or []), *(args.end_images or []),
                         shards=args.shards)
    # Before the checkpoint is even read: no output may replace an input or a checkpoint.
    if args.video:
        flag, path, problem = "--out", args.out, output_problem(args.out, inputs=inputs)
    else:
        flag, path = "--out_dir", args.out_dir
        problem = output_problem(args.out_dir, folder=True, inputs=inputs, names=written_names(from_images))
    if problem:
        print(f"error: {flag} {path} {problem}", file=sys.stderr)
        return 2

    from evdm import sample_io  # torch loads here, after the arguments are known good
    from evdm.checkpoint import CheckpointError
    from evdm.config import ConfigError, with_sample
    from evdm.denoiser import Denoiser, resolve_device
    from evdm.upconvert import UpconvertError, upconvert_video

    try:
        denoiser = Denoiser.load(args.ckpt, resolve_device(args.device), use_ema=not args.no_ema,
                                 color_mode=args.color_mode, precision=args.precision, compile=args.compile)
        flags = {"steps": args.steps, "eta": args.eta, "guidance_scale": args.guidance_scale,
                 "residual_floor": args.residual_floor}
        try:
            cfg = with_sample(denoiser.cfg, **flags)
        except ConfigError as err:  # name the flags, not the config keys
            given = " ".join(f"--{k} {v}" for k, v in flags.items() if v is not None)
            raise sample_io.SamplingError(f"{given}: {err}") from None
        if args.video:
            r = upconvert_video(args.video, args.out, denoiser, cfg, batch_size=args.batch_size, seed=args.seed)
            print(f"wrote {args.out}: {r['frames_in']} frames at {r['fps_in']:g} fps -> {r['frames_out']} frames at "
                  f"{r['fps_out']:g} fps ({r['factor']}x), {r['frames_per_s']:g} frames/s")
            return 0
        if from_images:
            start, end = sample_io.load_endpoints(args.start_images, args.end_images, cfg)
            jobs, total = sample_io.image_jobs(start, end, args.num_samples), args.num_samples
        else:
            jobs, total = sample_io.shard_jobs(args.shards, cfg, args.num, args.num_samples), args.num * args.num_samples
        results = sample_io.sample_to_files(jobs, total, denoiser, cfg, args.out_dir, seed=args.seed,
                                            batch_size=args.batch_size, keep_arrays=False)
    except (sample_io.SamplingError, CheckpointError, ConfigError, UpconvertError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except DiskFullError as err:  # the clips written before it are complete; no partial file is left
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(results)} clip(s) to {args.out_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
