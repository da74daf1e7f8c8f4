"""Train an endpoint-conditioned video diffusion model.

    python train.py CONFIG [--set section.key=value ...] [--resume | --overwrite]
    torchrun --nproc_per_node N train.py CONFIG      # DistributedDataParallel

SIGINT or SIGTERM (Ctrl-C, Slurm, Kubernetes, docker stop) stops after the current step, saves
out_dir/last.pt and exits 0; `--resume` continues from it. A disk that fills up stops the run with
one line and exit 1; the last checkpoint written before stays loadable.
"""

import argparse
import os
import sys
from pathlib import Path

from evdm.preemption import ignore_stop_signals, install_stop_handlers


def main(argv: list[str] | None = None) -> int:
    # Before anything imports torch (1-2 s): a signal during that import would end the process with 143.
    install_stop_handlers()
    try:
        return _main(argv)
    finally:
        # The run is over: saved, refused or failed. Python puts the default handlers back while it shuts
        # down, so a late Ctrl-C there would turn this exit status into 130; from here on signals are ignored.
        ignore_stop_signals()


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="TOML config, e.g. configs/bair.toml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (parsed as TOML); repeatable")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from out_dir/last.pt")
    mode.add_argument("--overwrite", action="store_true",
                      help="start over in an out_dir that holds a run (its checkpoints and metrics are removed)")
    args = parser.parse_args(argv)
    from evdm.atomic import DiskFullError
    from evdm.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as err:
        return _error(err, 2)
    from evdm.checkpoint import CheckpointError  # torch loads here, after the config is known good
    from evdm.train import train
    from evdm.train.step import TrainingDiverged

    try:
        out_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, CheckpointError) as err:
        return _error(err, 2)
    except (DiskFullError, TrainingDiverged) as err:  # not the input's fault: stop with what was saved
        return _error(err, 1)
    if os.environ.get("RANK", "0") == "0":  # one line for the run, not one per torchrun rank
        print(f"outputs in {out_dir}/ ({', '.join(run_outputs(out_dir))})")
    return 0


def run_outputs(out_dir: Path) -> list[str]:
    """The run's outputs that exist: a run stopped early may have no metrics, loss plot or previews yet."""
    names = ("last.pt", "best.pt", "metrics.jsonl", "loss.png", "previews/", "tensorboard/")
    paths = {name: out_dir / name for name in names}
    return [name for name, path in paths.items() if path.is_file() or (path.is_dir() and any(path.iterdir()))]


def _error(err: Exception, status: int) -> int:
    print(f"error: {err}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
