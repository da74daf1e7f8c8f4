"""One-line messages (errors, warnings) and the flags the command-line entry points share. Torch-free,
so `--help` and argument errors stay instant."""

import contextlib
import sys
import typing
from pathlib import Path

from evdm.config import ConfigError, SampleConfig
from evdm.data.schema import REMOTE_PREFIXES, expand_urls


def one_line(err: Exception) -> str:
    """The error as one line; a multi-line message (torch's unpickling essays) keeps its head only."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return lines[0] if len(lines) == 1 else lines[0].split(" (", 1)[0]


def warn(line: str) -> None:
    """One warning line on stderr (DataLoader workers share it): no traceback, no source line."""
    sys.stderr.write(f"warning: {line}\n")
    sys.stderr.flush()


def run_checkpoint(path: str) -> str:
    """`path`, or for a run folder (train.out_dir) its best.pt, the lowest validation loss, else its last.pt."""
    if not Path(path).is_dir():
        return path
    best = Path(path) / "best.pt"
    return str(best if best.is_file() else Path(path) / "last.pt")


def add_checkpoint_flag(parser) -> None:
    """--ckpt for sample.py and evdm.evaluate: a checkpoint file or a run folder (`run_checkpoint`)."""
    parser.add_argument("--ckpt", required=True, type=run_checkpoint,
                        help="checkpoint, or a run folder: its best.pt (lowest validation loss), else last.pt")


def add_speed_flags(parser) -> None:
    """--precision and --compile for sample.py and evdm.evaluate: overriding the checkpoint's sample settings."""
    hints = typing.get_type_hints(SampleConfig)
    parser.add_argument("--precision", choices=typing.get_args(hints["precision"]),
                        help="model forward precision (default: the checkpoint's sample.precision; "
                             "auto = bf16 on CUDA)")
    parser.add_argument("--compile", choices=typing.get_args(hints["compile"]),
                        help="torch.compile the model (default: the checkpoint's sample.compile; auto = on CUDA)")


def input_files(*paths: str | None, shards: str | None = None) -> list[str]:
    """The local files a command reads, for output_problem(inputs=...): `paths` (None left out) and the
    shards the pattern `shards` names (a pattern that names none adds none: the command reports it)."""
    files = [p for p in paths if p is not None]
    if shards is not None:
        with contextlib.suppress(ConfigError):
            files += [url for url in expand_urls(shards) if not url.startswith(REMOTE_PREFIXES)]
    return files
