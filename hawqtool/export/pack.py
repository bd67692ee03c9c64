"""Bit packing of quantized integers, in the layouts ONNX and onnxruntime's contrib ops read.

- :func:`pack_int4` / :func:`pack_int2`: signed integers as ONNX ``INT4`` / ``INT2`` raw data
  (the whole tensor flattened, first element in the lowest bits).
- :func:`pack_rows`: unsigned integers packed along the last axis, row by row, first element in
  the lowest bits: the ``B`` input of ``com.microsoft.MatMulNBits`` (rows = output channels,
  packed along K) and the ``uint8`` data of ``com.microsoft.GatherBlockQuantized``.
- :func:`offset_unsigned`: symmetric signed integers ``q`` as the unsigned ``q + 2^(b-1)`` those
  ops store when their ``zero_points`` input is left out (the default zero point is
  ``2^(b-1)``), so that they dequantize to exactly ``q · scale``.
"""

from __future__ import annotations

import numpy as np

#: Bit widths onnxruntime's MatMulNBits and GatherBlockQuantized (uint8 data) pack.
PACKED_OP_BITS = (2, 4, 8)


def pack_int2(values: np.ndarray) -> bytes:
    """Pack signed 2-bit integers four per byte, first element in the lowest two bits (ONNX INT2).

    Raises:
        ValueError: a value outside [-2, 1].

    Example:
        >>> pack_int2(np.array([1, -2, 0, -1, 1], dtype=np.int8)).hex()
        'c901'
    """
    flat = np.asarray(values, dtype=np.int8).reshape(-1)
    if flat.size and (flat.min() < -2 or flat.max() > 1):
        raise ValueError("int2 values must lie in [-2, 1]")
    flat = np.concatenate([flat, np.zeros(-flat.size % 4, np.int8)]).view(np.uint8) & 0x03
    crumbs = flat.reshape(-1, 4)
    return (
        (crumbs[:, 0] | crumbs[:, 1] << 2 | crumbs[:, 2] << 4 | crumbs[:, 3] << 6).astype(np.uint8).tobytes()
    )


def pack_int4(values: np.ndarray) -> bytes:
    """Pack signed 4-bit integers two per byte, first element in the low nibble (ONNX INT4 raw data).

    Raises:
        ValueError: a value outside [-8, 7].

    Example:
        >>> pack_int4(np.array([1, -2, 7], dtype=np.int8)).hex()
        'e107'
    """
    flat = np.asarray(values, dtype=np.int8).reshape(-1)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("int4 values must lie in [-8, 7]")
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nib = flat.view(np.uint8) & 0x0F
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()


def offset_unsigned(q: np.ndarray, bits: int) -> np.ndarray:
    """Signed ``bits``-bit integers as unsigned ones with the midpoint zero point: ``q + 2^(bits-1)``.

    Raises:
        ValueError: a value outside the signed ``bits``-bit range.

    Example:
        >>> offset_unsigned(np.array([-8, 0, 7], dtype=np.int8), 4).tolist()
        [0, 8, 15]
    """
    q = np.asarray(q)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if q.size and (q.min() < lo or q.max() > hi):
        raise ValueError(f"{bits}-bit values must lie in [{lo}, {hi}]")
    return (q.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit integers along the last axis, first element in the lowest bits.

    Args:
        values: unsigned integers below ``2^bits``, shape ``(..., L)`` with ``L · bits`` a multiple
            of 8 (each row packs into whole bytes, as MatMulNBits and GatherBlockQuantized need).
        bits: 2, 4 or 8.

    Returns:
        ``uint8`` array of shape ``(..., L · bits / 8)``.

    Raises:
        ValueError: ``bits`` not in :data:`PACKED_OP_BITS`, a value of more than ``bits`` bits,
            or rows that do not fill whole bytes.

    Example:
        >>> pack_rows(np.array([[1, 2], [15, 0]], dtype=np.uint8), 4).tolist()
        [[33], [15]]
    """
    if bits not in PACKED_OP_BITS:
        raise ValueError(f"bits {bits} cannot be packed; allowed: {', '.join(map(str, PACKED_OP_BITS))}")
    u = np.asarray(values, dtype=np.uint8)
    if u.size and int(u.max()) >= 2**bits:
        raise ValueError(f"{bits}-bit unsigned values must lie in [0, {2**bits - 1}]")
    per = 8 // bits
    if u.shape[-1] % per:
        raise ValueError(f"rows of {u.shape[-1]} {bits}-bit values do not fill whole bytes")
    groups = u.reshape(*u.shape[:-1], -1, per)
    out = np.zeros(groups.shape[:-1], np.uint8)
    for j in range(per):
        out |= groups[..., j] << (bits * j)
    return out
