"""Train an endpoint-conditioned video diffusion model.

    python train.py CONFIG [--set section.key=value ...] [--resume | --overwrite]
    torchrun --nproc_per_node N train.py CONFIG      # DistributedDataParallel

SIGINT or SIGTERM (Ctrl-C, Slurm, Kubernetes, docker stop) stops after the current step, saves
out_dir/last.pt and exits 0; `--resume` continues from it.
"""

import argparse
import sys

from evdm.checkpoint import CheckpointError
from evdm.config import ConfigError, load_config
from evdm.preemption import install_stop_handlers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="TOML config, e.g. configs/bair.toml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (parsed as TOML); repeatable")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from out_dir/last.pt")
    mode.add_argument("--overwrite", action="store_true",
                      help="start over in an out_dir that holds a run (its checkpoints and metrics are removed)")
    args = parser.parse_args(argv)
    install_stop_handlers()  # until the process ends: a signal at any moment is a clean stop, no traceback
    try:
        cfg = load_config(args.config, args.set)
        from evdm.train import train  # after the config is known good: torch import is slow

        out_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"outputs in {out_dir}/ (last.pt, metrics.jsonl, loss.png, previews/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
