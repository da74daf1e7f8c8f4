"""Optional in-process decoder (PyAV): same frames as preprocess.video.decode_ffmpeg, no subprocess.

It runs the very filter chain the ffmpeg path passes to -vf (fps, crop, area scale, format) through
libavfilter, so the pixels match (tests/test_video.py and tests/test_containers.py check this). What
the ffmpeg command line adds on its own is added here by hand: the autorotate filters for the
frame's display matrix (preprocess.video.orient_filters) and the stream's sample aspect ratio on the
graph's input (PyAV's Graph.add_buffer would state square pixels). PyAV bundles its own FFmpeg
libraries, so a future version mismatch could change rounding; the tests would then fail.
Import this module only when `--decoder pyav` is asked for: `av` is an optional dependency.
"""

from __future__ import annotations

import time
from pathlib import Path

import av
import numpy as np
from av.filter import Graph
from av.sidedata.sidedata import Type as SideDataType

from preprocess.video import (VideoError, VideoInfo, check_readable, filter_specs, logged_rate, orient_filters,
                              rotation_degrees, sar_text)


def _open_error(err: Exception) -> VideoError:
    if isinstance(err, av.error.InvalidDataError):
        return VideoError("not a video or damaged (PyAV: Invalid data found when processing input)")
    return VideoError(f"PyAV: {err}")


def display_matrix(frame: av.VideoFrame) -> list[int] | None:
    """The frame's 3x3 display matrix (16.16 fixed point, row-major), or None when it has none."""
    data = frame.side_data.get(SideDataType.DISPLAYMATRIX)
    return None if data is None else np.frombuffer(bytes(data), np.int32).tolist()


def stream_sar(stream: av.video.stream.VideoStream) -> str:
    """The sample aspect ratio the ffmpeg command line uses: the container's, else the codec's."""
    sar = stream.sample_aspect_ratio
    return sar_text(sar.numerator, sar.denominator) if sar else "1:1"


def stream_rate(stream: av.video.stream.VideoStream) -> float | None:
    """The stream's frame rate at the precision the ffmpeg path reports it; None when it states none."""
    rate = stream.average_rate or stream.guessed_rate
    return logged_rate(float(rate)) if rate else None


def probe_rate_pyav(path: str | Path) -> float | None:
    """stream_rate of a file's first video stream from its header, without decoding; None when unreadable."""
    try:
        with av.open(str(path)) as container:
            return stream_rate(container.streams.video[0]) if container.streams.video else None
    except (av.error.FFmpegError, OSError, ValueError):
        return None


def build_graph(stream, first: av.VideoFrame, specs: list[tuple[str, str | None]]) -> Graph:
    """A filter graph from the stream's geometry, SAR and time base through `specs` to a sink."""
    graph = Graph()
    node = graph.add("buffer", video_size=f"{first.width}x{first.height}", pix_fmt=str(first.format.name),
                     time_base=str(stream.time_base), pixel_aspect=stream_sar(stream).replace(":", "/"))
    for name, args in specs:
        nxt = graph.add(name, args)
        node.link_to(nxt)
        node = nxt
    sink = graph.add("buffersink")
    node.link_to(sink)
    graph.configure()
    return graph


def decode_pyav(path: str | Path, size: int, color_mode: str = "rgb",
                fps: float | None = None) -> tuple[np.ndarray, VideoInfo, float]:
    """Decode a whole video: (frames uint8 [N, size, size, C], source info, decode wall seconds)."""
    check_readable(path)
    started = time.perf_counter()
    frames, graph, rotation = [], None, 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("no video stream (zero frames, or audio only)")
            stream = container.streams.video[0]
            stream.thread_count = 1  # the pool already uses every core; threads only add overhead
            for frame in container.decode(stream):
                if graph is None:  # the display matrix travels with the frames
                    matrix = display_matrix(frame)
                    rotation = rotation_degrees(matrix)
                    graph = build_graph(stream, frame, orient_filters(matrix) + filter_specs(size, color_mode, fps))
                if fps and frame.pts is None:
                    raise VideoError("frames without timestamps: cannot resample with --fps (try --decoder ffmpeg)")
                graph.push(frame)
                frames += _drain(graph)
            info = VideoInfo(stream.codec_context.width, stream.codec_context.height, stream_rate(stream),
                             sar=stream_sar(stream), rotation=rotation)
            if graph is not None:
                graph.push(None)  # flush: the fps filter may hold frames until the end
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
