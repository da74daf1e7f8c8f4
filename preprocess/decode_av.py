"""Optional in-process decoder (PyAV): same frames as preprocess.video.decode_ffmpeg, no subprocess.

It runs the very filter chain the ffmpeg path passes to -vf (crop, area scale, format) through
libavfilter, so the pixels match (tests/test_video.py checks this). PyAV bundles its own FFmpeg
libraries, so a future version mismatch could change rounding; the test would then fail.
Import this module only when `--decoder pyav` is asked for: `av` is an optional dependency.
"""

from __future__ import annotations

import time
from pathlib import Path

import av
import numpy as np
from av.filter import Graph

from preprocess.video import VideoError, VideoInfo, check_readable, filter_specs


def _open_error(err: Exception) -> VideoError:
    if isinstance(err, av.error.InvalidDataError):
        return VideoError("not a video or damaged (PyAV: Invalid data found when processing input)")
    return VideoError(f"PyAV: {err}")


def decode_pyav(path: str | Path, size: int, color_mode: str = "rgb") -> tuple[np.ndarray, VideoInfo, float]:
    """Decode a whole video: (frames uint8 [N, size, size, C], source info, decode wall seconds)."""
    check_readable(path)
    started = time.perf_counter()
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("no video stream (zero frames, or audio only)")
            stream = container.streams.video[0]
            stream.thread_count = 1  # the pool already uses every core; threads only add overhead
            rate = stream.average_rate or stream.guessed_rate
            info = VideoInfo(stream.codec_context.width, stream.codec_context.height,
                             float(rate) if rate else None)
            graph = Graph()
            node = graph.add_buffer(template=stream)
            for name, args in filter_specs(size, color_mode):
                nxt = graph.add(name, args)
                node.link_to(nxt)
                node = nxt
            sink = graph.add("buffersink")
            node.link_to(sink)
            graph.configure()
            for frame in container.decode(stream):
                graph.push(frame)
                frames += _drain(graph)
            graph.push(None)  # flush: scale/format hold no frames, but be exact
            frames += _drain(graph)
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise _open_error(err) from None
    seconds = time.perf_counter() - started
    if not frames:
        raise VideoError("zero frames decoded")
    out = np.stack(frames)
    return (out if out.ndim == 4 else out[..., None]), info, seconds


def _drain(graph: Graph) -> list[np.ndarray]:
    out = []
    while True:
        try:
            out.append(graph.pull().to_ndarray())
        except (av.error.BlockingIOError, av.error.EOFError):
            return out
