"""Frame rates before any decoding, for `preprocess.shard --fps`: read from the videos' headers, and the
check that --fps does not mostly repeat frames.

Where it is cheapest: the rates must all be known before the first shard is written, so they are read
from the headers, not from the decode. One `ffmpeg -i A -i B ...` reads PROBE_BATCH videos (a process
per video costs about ten times as much), PyAV opens each in-process; the batches run in the worker
pool, only with --fps, and only for videos not yet in a finished shard (progress.json records the others).
"""

from __future__ import annotations

from pathlib import Path

from evdm.cli import warn
from preprocess.options import UserError
from preprocess.plan import worker_map
from preprocess.progress import Progress
from preprocess.video import probe_rates

PROBE_BATCH = 64  # videos whose frame rates one task reads
# --fps above this multiple of a video's own rate is refused unless --allow-upsampling: most frames of its
# clips would be copies of the one before. Ratios up to 1.001 are equal rates at the precision ffmpeg prints.
MAX_UPSAMPLING, SAME_RATE = 2.0, 1.001


def probe_task(args: tuple[list[Path], str]) -> list[float | None]:
    """The videos' frame rates as their decoder will report them, from the headers alone (no decoding); None
    where unknown or unreadable (the decode then says why)."""
    paths, decoder = args
    if decoder == "pyav":
        from preprocess.decode_av import probe_rate_pyav

        return [probe_rate_pyav(path) for path in paths]
    return probe_rates(paths)


def source_rates(data_dir: Path, videos: list[str], state: dict, decoder: str, workers: int,
                 show_progress: bool) -> dict[str, float | None]:
    """{video: frame rate}: recorded in progress.json for the videos of finished shards, probed for the rest."""
    known = {s["path"]: s["fps"] for r in state["shards"].values() for s in r.get("sources", ())}
    todo = [rel for rel in videos if rel not in known]
    batches = [todo[i:i + PROBE_BATCH] for i in range(0, len(todo), PROBE_BATCH)]
    tasks = [([data_dir / rel for rel in batch], decoder) for batch in batches]
    with Progress("videos probed", len(todo), quiet=not show_progress) as progress, \
            worker_map(probe_task, tasks, workers) as results:
        for batch, rates in zip(batches, results):
            known.update(zip(batch, rates))
            progress.advance(len(batch))
    return {rel: known[rel] for rel in videos}  # in the selection's order, whatever was recorded


def check_upsampling(rates: dict[str, float | None], fps: float, allow: bool) -> None:
    """One warning line when --fps is above some videos' own rate (their frames are repeated to fill it); a
    UserError when it is over MAX_UPSAMPLING x the rate of any, unless `allow`."""
    factors = {rel: fps / rate for rel, rate in rates.items() if rate and fps / rate > SAME_RATE}
    if not factors:
        return
    worst = max(factors, key=factors.get)
    over = sum(f > MAX_UPSAMPLING for f in factors.values())
    most = f"up to {factors[worst]:.3g}x: {worst} at {rates[worst]:g} fps"
    if over and not allow:
        raise UserError(f"--fps {fps:g} is over {MAX_UPSAMPLING:g}x the frame rate of {over} videos ({most}): "
                        "their clips would be mostly repeated frames; lower --fps, or pass --allow-upsampling")
    warn(f"--fps {fps:g} is above the frame rate of {len(factors)} videos ({most}): their frames are repeated "
         "to fill it")
