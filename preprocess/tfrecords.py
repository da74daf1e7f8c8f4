"""Reading TFRecord files without TensorFlow: framing and CRC checks here, Example protos via `tfrecord`.

A TFRecord file is a sequence of records, each framed as
  uint64 length (little-endian) | uint32 masked crc32c(length bytes) | data | uint32 masked crc32c(data)
(tensorflow/core/lib/io/record_writer.h; the mask is crc32c.h's Mask()). `tfrecord.reader.tfrecord_iterator`
(1.14.6) reads this framing but checks neither CRC and raises on the first short read, so the framing is
read here with both CRCs verified: a record whose data CRC fails is reported and the file goes on
(its length is intact); a bad length CRC or a truncation ends the file, since nothing after it can be
located. Example protos are parsed with `tfrecord.example_pb2` (tensorflow's example.proto).
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import crc32c

_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
HEADER_BYTES = _LENGTH.size + _CRC.size  # 12
FOOTER_BYTES = _CRC.size  # 4
_MASK_DELTA = 0xA282EAD8


class RecordError(Exception):
    """A record (or the rest of a file) that cannot be used; str() is the one-line reason."""


class CorruptData(RecordError):
    """A record whose data fails its CRC while its length framing is intact: the next one can be read."""

    def __init__(self, message: str, next_offset: int):
        super().__init__(message)
        self.next_offset = next_offset


@dataclass(frozen=True)
class RecordSpan:
    """Where record `index` of a file lies: its data is bytes [offset + 12, offset + 12 + length)."""

    index: int
    offset: int
    length: int


def masked_crc32c(data: bytes | memoryview) -> int:
    """TensorFlow's masked CRC-32C: rotate right by 15 bits, add 0xa282ead8 (mod 2**32)."""
    crc = crc32c.crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def _import_example_pb2():
    # tfrecord/__init__.py imports tfrecord.torch (and so torch) whenever torch is installed; preprocess
    # stays torch-free, so that one submodule is hidden for the duration of the import (a None entry in
    # sys.modules makes its import raise ImportError, which tfrecord catches) and unhidden after.
    hide = "tfrecord" not in sys.modules and "tfrecord.torch" not in sys.modules
    if hide:
        sys.modules["tfrecord.torch"] = None  # type: ignore[assignment]
    try:
        from tfrecord import example_pb2
    finally:
        if hide:
            del sys.modules["tfrecord.torch"]
    return example_pb2


example_pb2 = _import_example_pb2()


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    return data if len(data) == n else b""


def read_record_at(f: BinaryIO, offset: int) -> tuple[bytes, int]:
    """The data of the record framed at `offset` and the offset of the next one; raises RecordError."""
    f.seek(offset)
    header = f.read(HEADER_BYTES)
    if len(header) != HEADER_BYTES:
        raise RecordError(f"truncated record header ({len(header)} of {HEADER_BYTES} bytes)")
    length_bytes = header[: _LENGTH.size]
    if masked_crc32c(length_bytes) != _CRC.unpack_from(header, _LENGTH.size)[0]:
        raise RecordError("corrupt record header (length CRC mismatch)")
    (length,) = _LENGTH.unpack(length_bytes)
    data = _read_exact(f, length)
    footer = _read_exact(f, FOOTER_BYTES)
    if not footer:
        raise RecordError(f"truncated record (header says {length} data bytes; the file ends first)")
    next_offset = offset + HEADER_BYTES + length + FOOTER_BYTES
    if masked_crc32c(data) != _CRC.unpack(footer)[0]:
        raise CorruptData("corrupt record data (data CRC mismatch)", next_offset)
    return data, next_offset


def iter_records(path: str | Path) -> Iterator[tuple[RecordSpan, bytes | RecordError]]:
    """Every record of a file in order: (span, data) or (span, RecordError) for a bad one.

    A data CRC mismatch yields an error and reading goes on with the next record; a bad length CRC or a
    truncation yields an error (its span.length is -1) and ends the file.
    """
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        offset, index = 0, 0
        while offset < size:
            item: bytes | RecordError
            try:
                item, next_offset = read_record_at(f, offset)
            except CorruptData as err:
                item, next_offset = err, err.next_offset
            except RecordError as err:
                yield RecordSpan(index, offset, -1), RecordError(f"{err}; the rest of the file is unreadable")
                return
            yield RecordSpan(index, offset, next_offset - offset - HEADER_BYTES - FOOTER_BYTES), item
            offset = next_offset
            index += 1


def parse_example(data: bytes) -> dict:
    """Serialized tf.train.Example -> its feature map {key: Feature}; raises RecordError if unparseable."""
    example = example_pb2.Example()
    try:
        example.ParseFromString(data)
    except Exception as err:  # google.protobuf.message.DecodeError, with implementation-specific siblings
        raise RecordError(f"not a tf.train.Example ({type(err).__name__}: {err})") from None
    return example.features.feature
