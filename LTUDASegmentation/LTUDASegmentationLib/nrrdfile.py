"""Write a 3D scalar volume as NRRD with numpy and zlib only: no VTK, no MRML, no Qt.

Used by the training export's worker thread (export.py), which must not touch VTK or MRML. The
header carries what Slicer's own writer writes for a volume: the type, sizes, LPS space
directions and origin (from the node's IJK-to-RAS matrix), raw or gzip encoding. zlib and file
writes release the GIL, so the GUI thread keeps running while a file is written. The file is
written to `<path>.part` and renamed when complete: a cancelled or failed write leaves no partial
file under the final name.
"""

import os
import zlib

import numpy as np

NRRD_TYPES = {"int8": "signed char", "uint8": "unsigned char", "int16": "short", "uint16": "unsigned short",
              "int32": "int", "uint32": "unsigned int", "int64": "long long", "uint64": "unsigned long long",
              "float32": "float", "float64": "double"}
CHUNK_BYTES = 4 * 1024 * 1024


class WriteCancelled(Exception):
    """The write was stopped by its `cancelled()` callback; no file was left behind."""


def _number(value):
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def nrrdHeader(shape, dtype, ijkToRas, compress):
    """Header text for an array of numpy shape (k, j, i) with the given 4x4 IJK-to-RAS matrix."""
    dtype = np.dtype(dtype)
    if dtype.name not in NRRD_TYPES:
        raise ValueError(f"NRRD cannot hold {dtype.name} voxels here")
    ijkToLps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(ijkToRas, dtype=float)
    directions = " ".join("(" + ",".join(_number(v) for v in ijkToLps[:3, axis]) + ")" for axis in range(3))
    origin = "(" + ",".join(_number(v) for v in ijkToLps[:3, 3]) + ")"
    endian = "big" if dtype.byteorder == ">" or (dtype.byteorder == "=" and np.little_endian is False) else "little"
    lines = ["NRRD0004",
             "# Complete NRRD file format specification at:",
             "# http://teem.sourceforge.net/nrrd/format.html",
             f"type: {NRRD_TYPES[dtype.name]}",
             "dimension: 3",
             "space: left-posterior-superior",
             f"sizes: {shape[2]} {shape[1]} {shape[0]}",
             f"space directions: {directions}",
             "kinds: domain domain domain",
             f"endian: {endian}",
             f"encoding: {'gzip' if compress else 'raw'}",
             f"space origin: {origin}"]
    return "\n".join(lines) + "\n\n"


def writeNrrd(path, array, ijkToRas, compress=False, cancelled=None):
    """Write `array` (numpy order k, j, i) to `path`; `cancelled()` is asked between chunks and,
    when it returns True, the partial file is removed and WriteCancelled raised."""
    array = np.ascontiguousarray(array)
    if array.ndim != 3:
        raise ValueError("writeNrrd writes 3D scalar volumes")
    data = memoryview(array.reshape(-1).view(np.uint8))
    part = str(path) + ".part"
    try:
        with open(part, "wb") as f:
            f.write(nrrdHeader(array.shape, array.dtype, ijkToRas, compress).encode("ascii"))
            compressor = zlib.compressobj(1, zlib.DEFLATED, 31) if compress else None  # 31: gzip wrapper
            for start in range(0, len(data), CHUNK_BYTES):
                if cancelled is not None and cancelled():
                    raise WriteCancelled()
                chunk = data[start:start + CHUNK_BYTES]
                f.write(compressor.compress(chunk) if compressor else chunk)
            if compressor:
                f.write(compressor.flush())
        os.replace(part, str(path))
    except BaseException:
        try:
            os.remove(part)
        except OSError:
            pass
        raise
