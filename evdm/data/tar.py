"""Reading shards (evdm.data.schema): tar and .npy parsing, clip references, damage detection. Local shards
are read with positioned reads; pipe: and remote URLs are read whole through webdataset's gopen."""

import ast
import contextlib
import functools
import os
import struct
from typing import Iterator

import numpy as np
import webdataset as wds

from evdm.config import ConfigError
from evdm.data.schema import CLIP_EXT, REMOTE_PREFIXES

# What damage in a shard surfaces as, from open() to the tar walk and the .npy header parse.
DAMAGE = (OSError, ValueError, struct.error)
_READ_BUFFER_BYTES = 1 << 20
_NPY_MAGIC = b"\x93NUMPY"
# name, size, typeflag, magic ("ustar" + NUL or space), prefix: the ustar header fields used here
_TAR_HEADER = struct.Struct("100s24x12s20xc100x5s3x80x155s12x")


def index_tar(read_at, end: int, url: str, heads: list | None = None) -> list[tuple[str, int, int]]:
    """(member name, data offset, size) of each regular member of a tar of `end` bytes; `read_at(pos, n)` returns
    n bytes at pos. A minimal ustar/GNU/pax header walk. With `heads`, each header is read with the block after
    it (one read either way), and that block (a regular member's first 512 data bytes) is appended to `heads`."""
    if end < 512:  # even an empty tar is 1024 zero bytes
        raise OSError(f"{url}: " + ("empty file (0 bytes)" if end == 0 else f"not a tar file ({end} bytes)"))
    members: list[tuple[str, int, int]] = []
    long_name: bytes | None = None
    pos = 0
    while pos + 512 <= end:
        block = read_at(pos, 1024 if heads is not None else 512)
        name, size_field, kind, magic, prefix = _TAR_HEADER.unpack_from(block)
        if not name[:1].strip(b"\0"):  # end-of-archive zero block
            break
        try:
            if magic != b"ustar":  # ustar, GNU and pax headers all carry it; damage or a foreign file does not
                raise ValueError
            size = int(size_field.strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise OSError(f"{url}: not a tar file or a damaged tar header at byte {pos}") from None
        data = pos + 512
        pos = data + ((size + 511) & ~511)
        if data + size > end:
            raise OSError(f"{url}: truncated tar (member at byte {data - 512} runs past the end)")
        if kind == b"L":  # GNU long name of the next member
            long_name = bytes(read_at(data, size)).rstrip(b"\0")
        elif kind == b"x":  # pax extended header: records "LEN key=value\n"; only path matters here
            for rec in bytes(read_at(data, size)).splitlines():
                if b" path=" in rec:
                    long_name = rec.split(b" path=", 1)[1]
        elif kind in b"0\0":
            if long_name is not None:
                name, long_name = long_name, None
            else:
                name = name.rstrip(b"\0")
                if prefix[:1] != b"\0":
                    name = prefix.rstrip(b"\0") + b"/" + name
            members.append((name.decode(), data, size))
            if heads is not None:
                heads.append(block[512:512 + size])
        else:
            long_name = None
    else:  # ran out of bytes before the end-of-archive block: the file was cut at a member boundary
        raise OSError(f"{url}: truncated tar (no end-of-archive block, {end} bytes)")
    return members


def npy_layout(data: bytes | memoryview, where: str) -> tuple[bytes, tuple[int, ...]]:
    """(.npy header bytes, shape) of uint8 .npy data; raises ValueError naming `where` otherwise."""
    if len(data) < 10 or data[:6] != _NPY_MAGIC:
        raise ValueError(f"{where}: not a .npy file")
    start = 10 if data[6] == 1 else 12  # format 1.0: a 2-byte header length, later ones 4
    prefix = bytes(data[: start + int.from_bytes(data[8:start], "little")])
    try:
        return prefix, _npy_shape(prefix[start:])
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


@functools.lru_cache(maxsize=64)
def _npy_shape(header: bytes) -> tuple[int, ...]:
    try:  # damaged bytes can fail in any of these steps, each with its own exception type
        fields = ast.literal_eval(header.decode("latin1"))
        descr, fortran_order, shape = fields["descr"], fields["fortran_order"], tuple(fields["shape"])
        dtype = np.dtype(descr)
    except (SyntaxError, ValueError, TypeError, KeyError, MemoryError, RecursionError):
        raise ValueError(f"damaged .npy header {header[:60]!r}") from None
    if dtype != np.uint8 or fortran_order:
        raise ValueError(f"clip must be C-ordered uint8, got {fields}")
    return shape


def _open_shard(url: str):
    """(read_at, size, file or None): positioned reads of a local file, or of a remote shard read whole."""
    if url.startswith(REMOTE_PREFIXES):
        with wds.gopen(url, "rb", bufsize=_READ_BUFFER_BYTES) as stream:
            buf = memoryview(stream.read())
        return (lambda pos, n: buf[pos : pos + n]), len(buf), None
    f = open(url, "rb", buffering=0)
    fd = f.fileno()
    return (lambda pos, n: os.pread(fd, n, pos)), os.fstat(fd).st_size, f


def iter_clips(url: str) -> Iterator[tuple[str, np.ndarray]]:
    """(sample key, uint8 [T, H, W, C] read-only array) for each clip in the shard at `url`."""
    read_at, size, f = _open_shard(url)
    with f or contextlib.nullcontext():  # f: None for a remote shard
        suffix = "." + CLIP_EXT
        for name, offset, n in index_tar(read_at, size, url):
            if name.endswith(suffix):
                data = read_at(offset, n)
                prefix, shape = npy_layout(data, f"{url}: {name}")
                yield name[: -len(suffix)], np.frombuffer(data, np.uint8, offset=len(prefix)).reshape(shape)


def peek_clip_shape(url: str) -> tuple[int, ...]:
    """The [T, H, W, C] shape of the first clip in a shard."""
    for _, clip in iter_clips(url):
        return clip.shape
    raise ConfigError(f"shard {url} holds no {CLIP_EXT} sample")


def damage_reason(url: str, err: Exception) -> str:
    """What is wrong with shard `url`, without repeating its name."""
    if isinstance(err, OSError) and err.strerror:  # FileNotFoundError and friends
        return err.strerror
    return str(err).removeprefix(f"{url}: ")


def clip_refs(url: str, expected_shape: tuple[int, ...], keys: list | None = None) -> list:
    """Every clip of a shard as a reference for `fill_batch`: (file, offset, npy header) for local shards,
    the array itself for remote ones; with `keys`, the clips' sample keys are appended to it, in order.
    ConfigError naming the shard when its clips are not `expected_shape`."""
    read_at, size, f = _open_shard(url)
    suffix = "." + CLIP_EXT
    heads: list = []
    members = index_tar(read_at, size, url, heads)
    clips = [(name, offset, n, head) for (name, offset, n), head in zip(members, heads) if name.endswith(suffix)]
    if not clips:
        return []
    name, offset, n, _ = clips[0]
    prefix, shape = npy_layout(read_at(offset, min(n, 4096)), f"{url}: {name}")
    if shape != tuple(expected_shape):
        raise ConfigError(f"{url}: sample {name} has clip shape {shape}, "
                          f"config (data.T, data.size, data.color_mode) expects {tuple(expected_shape)}")
    want = len(prefix) + int(np.prod(shape))
    # Every clip's size and header are checked here, not when its pixels are read: a damaged shard is
    # rejected whole before any clip is batched, and a resume's fast-forward reaches the same verdict.
    bad = [name for name, o, n, head in clips
           if n != want or (head[:len(prefix)] if len(prefix) <= len(head) else read_at(o, len(prefix))) != prefix]
    if bad:
        raise ConfigError(f"{url}: sample {bad[0]} is not a {shape} uint8 clip like the shard's first one")
    if keys is not None:
        keys.extend(name[: -len(suffix)] for name, _, _, _ in clips)
    if f is None:
        return [np.frombuffer(read_at(o, n), np.uint8, offset=len(prefix)).reshape(shape) for _, o, n, _ in clips]
    return [(f, offset, prefix) for _, offset, _, _ in clips]


def read_clip(ref, shape: tuple[int, ...]) -> np.ndarray:
    """One clip from its `clip_refs` reference: uint8 `shape`."""
    out = np.empty((1, *shape), np.uint8)
    fill_batch(out, [ref])
    return out[0]


def fill_batch(out: np.ndarray, refs: list) -> None:
    """Write the clips `refs` (from `clip_refs`) into `out`: uint8 [B, T, H, W, C], one copy each."""
    for i, ref in enumerate(refs):
        if type(ref) is not tuple:
            out[i] = ref
            continue
        f, offset, prefix = ref
        head = bytearray(len(prefix))
        got = os.preadv(f.fileno(), [head, out[i]], offset)
        if got != len(head) + out[i].nbytes or head != prefix:
            raise OSError(f"{f.name}: clip at byte {offset} is truncated or changed since indexing")
