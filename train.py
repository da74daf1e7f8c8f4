"""Train an endpoint-conditioned video diffusion model.

    python train.py CONFIG [--set section.key=value ...] [--resume]
    torchrun --nproc_per_node N train.py CONFIG      # DistributedDataParallel
"""

import argparse
import sys

from evdm.checkpoint import CheckpointError
from evdm.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="TOML config, e.g. configs/bair.toml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (parsed as TOML); repeatable")
    parser.add_argument("--resume", action="store_true", help="continue from out_dir/last.pt")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        from evdm.train import train  # after the config is known good: torch import is slow

        out_dir = train(cfg, resume=args.resume)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"outputs in {out_dir}/ (last.pt, metrics.jsonl, loss.png, previews/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
