"""ffmpeg's minterpolate filter, the interpolation peer evdm is scored against (torch-free). It fills the frames the
model does: a clip's middle at w = (m + 1) / (M + 1) between its last start and first end frame (`interpolate_clips`;
`run_graph` also runs one pass over a whole video), the observed frames fed at their true instants. RGB travels
unconverted as the planes G, B, R labelled yuv444p; docs/GUIDE.md ("Design notes") says why."""

import itertools
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from evdm.ffmpeg import ffmpeg_exe

GRID_MB_SIZES = (4, 8, 16)  # minterpolate needs at least two blocks across: mb_size <= size / 2
GRID_ME_MODES = ("bidir", "bilat")


class PeerError(RuntimeError):
    """ffmpeg failed or returned other frames than asked; the message is one line."""


@dataclass(frozen=True)
class Setting:
    """One minterpolate configuration; search (epzs, search_param 32) at ffmpeg's defaults."""

    mi_mode: str = "mci"  # "mci" or "blend"
    mb_size: int = 16
    me_mode: str = "bidir"
    mc_mode: str = "obmc"
    vsbmc: bool = False

    def options(self) -> str:
        if self.mi_mode == "blend":
            return "mi_mode=blend:scd=none"
        return (f"mi_mode=mci:mc_mode={self.mc_mode}:me_mode={self.me_mode}:mb_size={self.mb_size}"
                f":vsbmc={int(self.vsbmc)}:scd=none")

    @property
    def name(self) -> str:
        """The row name: "ffmpeg minterpolate mci (mb_size 4, bidir, aobmc, vsbmc)"."""
        if self.mi_mode == "blend":
            return "ffmpeg minterpolate blend"
        extras = [self.mc_mode] if self.mc_mode != "obmc" else []
        extras += ["vsbmc"] if self.vsbmc else []
        return f"ffmpeg minterpolate mci (mb_size {self.mb_size}, {', '.join([self.me_mode, *extras])})"


BLEND = Setting(mi_mode="blend")


def mci_grid(size: int) -> list[Setting]:
    """The mci settings for a frame size: mb_size 4, 8, 16 (<= size / 2) x bidir, bilat x (obmc; aobmc + vsbmc)."""
    return [Setting(mb_size=mb, me_mode=me, mc_mode=mc, vsbmc=mc == "aobmc")
            for mb, me, mc in itertools.product(GRID_MB_SIZES, GRID_ME_MODES, ("obmc", "aobmc")) if mb <= size // 2]


def to_planes(frames: np.ndarray) -> bytes:
    """uint8 [..., H, W, C] -> planar bytes, RGB as the planes G, B, R (see the module doc)."""
    planes = frames[..., [1, 2, 0]] if frames.shape[-1] == 3 else frames
    return np.ascontiguousarray(np.moveaxis(planes, -1, -3)).tobytes()


def from_planes(data: bytes, height: int, width: int, channels: int) -> np.ndarray:
    """The inverse of to_planes: planar bytes -> uint8 [n, H, W, C]."""
    frames = np.moveaxis(np.frombuffer(data, np.uint8).reshape(-1, channels, height, width), 1, -1)
    return np.ascontiguousarray(frames[..., [2, 0, 1]] if channels == 3 else frames)


def run_graph(frames: np.ndarray, graph: str, expected: int) -> np.ndarray:
    """Feed frames uint8 [n, H, W, C] at 1 frame/s through the filter graph (input [0:v], output [out]);
    the `expected` frames it returns as uint8 [expected, H, W, C]. PeerError with ffmpeg's first error."""
    _, height, width, channels = frames.shape
    pix_fmt = "yuv444p" if channels == 3 else "gray"
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", pix_fmt,
           "-s", f"{width}x{height}", "-r", "1", "-i", "pipe:", "-filter_complex", graph, "-map", "[out]",
           "-f", "rawvideo", "-pix_fmt", pix_fmt, "-fps_mode", "passthrough", "pipe:"]
    proc = subprocess.run(cmd, input=to_planes(frames), capture_output=True)
    errors = proc.stderr.decode(errors="replace").strip().splitlines()
    got = len(proc.stdout) // (height * width * channels)
    if proc.returncode or got != expected:
        raise PeerError(f"ffmpeg minterpolate returned {got} frames, expected {expected}"
                        + (f" ({errors[0]})" if errors else ""))
    return from_planes(proc.stdout, height, width, channels)


def interpolate_clips(clips: np.ndarray, context: tuple[int, int], setting: Setting) -> np.ndarray:
    """minterpolate's middles of clips uint8 [B, T, H, W, C] with `context` = (Ks, Ke) observed frames at
    each end: uint8 [B, M, H, W, C], M = T - Ks - Ke. Only the observed frames are read; one ffmpeg process
    for the batch (a split, one minterpolate per clip, a concat)."""
    (Ks, Ke), (B, T) = context, clips.shape[:2]
    M = T - Ks - Ke
    fed = np.concatenate([clips[:, :Ks], clips[:, T - Ke:], clips[:, -1:]], axis=1)  # + the last frame again
    n = fed.shape[1]
    # Per clip: its frames at their instants (the end frames and the copy after them M later), one output a
    # second, kept from Ks to Ks + M - 1.
    branch = (f"trim=start_frame={{first}}:end_frame={{last}},setpts=(N+gte(N\\,{Ks})*{M})/TB,"
              f"minterpolate=fps=1:{setting.options()},select=between(t\\,{Ks - 0.5}\\,{Ks + M - 0.5})")
    graph = ";".join([f"[0:v]split={B}" + "".join(f"[i{b}]" for b in range(B)),
                      *(f"[i{b}]" + branch.format(first=b * n, last=(b + 1) * n) + f"[o{b}]" for b in range(B)),
                      "".join(f"[o{b}]" for b in range(B)) + f"concat=n={B}:v=1:a=0[out]"])
    return run_graph(fed.reshape(B * n, *clips.shape[2:]), graph, B * M).reshape(B, M, *clips.shape[2:])


def interpolate_grid(clips: np.ndarray, context: tuple[int, int], settings: list[Setting]) -> dict[Setting, np.ndarray]:
    """`interpolate_clips` for each setting, the ffmpeg processes running side by side (one per CPU)."""
    with ThreadPoolExecutor(max_workers=min(len(settings), os.cpu_count() or 1)) as pool:
        return dict(zip(settings, pool.map(lambda s: interpolate_clips(clips, context, s), settings)))


def version() -> str:
    """ffmpeg's version line ("ffmpeg version n7.1 ..."), for the record of a result."""
    proc = subprocess.run([ffmpeg_exe(), "-hide_banner", "-version"], capture_output=True, text=True)
    return (proc.stdout.splitlines() or ["unknown"])[0]
