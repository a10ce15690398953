"""Decompression bombs for the tests of the converters, the loader and the evaluations."""

from __future__ import annotations

import functools
import struct
import zlib


@functools.cache
def png_bomb(side: int) -> bytes:
    """A real 1-bit PNG of side x side black pixels: tens of KB on disk, side**2 pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row = bytes(1 + (side + 7) // 8)  # filter byte 0 + the packed row
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
            + chunk(b"IEND", b""))  # fmt: skip
