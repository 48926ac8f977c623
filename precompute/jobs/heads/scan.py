"""The heads job's per-batch reduction of attention patterns as a compiled kernel (numba), for
the CPU. It reads each head's causal triangle of the scored queries once and writes only the
sums, where the torch ops of ``job._accumulate`` (the GPU path) make several full-size copies of
a batch's patterns (masked, squared, entropy terms). Definitions are in ``job.py``'s docstring.

Sums are float64, each head's in a fixed order (row, query, key), so the result does not depend
on how many threads share the heads. The entropy's ``ln a`` is computed from the float's
exponent and mantissa (``xlogx``: a series accurate to about 1e-10 relative), so the loop over a
query's keys compiles to vector instructions; a library ``log`` would take ten times longer.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

_FAST = {"reassoc", "contract", "nsz", "arcp"}  # the entropy's sum is reordered (vectorised)
_LN2 = math.log(2.0)
_SQRT2 = math.sqrt(2.0)
_MANTISSA = np.int32(0x007FFFFF)
_ONE = np.int32(0x3F800000)  # the bits of 1.0f
_BIG = np.int32(0x4B000000)  # the bits of 2^23 (an 8-bit integer ORed in is exact)
_EXP = np.int32(0xFF)
_SHIFT = np.int32(23)


@intrinsic
def _f32_bits(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int32))

    return types.int32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.int32), codegen


@njit(cache=True, inline="always", fastmath=_FAST, error_model="numpy")
def xlogx(a):
    """``a ln a`` for a float32 ``a >= 0`` (0 for 0 and for subnormal ``a``, whose terms are below
    1e-36), in float64: ``a = m 2^e`` with ``m`` in [sqrt(1/2), sqrt(2)), ``ln m = 2 atanh(s)``,
    ``s = (m - 1) / (m + 1)``, ``|s| < 0.172``, summed to ``s^11``."""
    i = _f32_bits(a)
    m = np.float64(_bits_f32((i & _MANTISSA) | _ONE))
    e = np.float64(_bits_f32(((i >> _SHIFT) & _EXP) | _BIG)) - 8388735.0  # 2^23 + 127
    big = m > _SQRT2
    m = m * 0.5 if big else m
    e = e + 1.0 if big else e
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    ln = e * _LN2 + 2.0 * s * (1.0 + s2 * (1.0 / 3 + s2 * (1.0 / 5 + s2 * (1.0 / 7 + s2 * (1.0 / 9 + s2 * (1.0 / 11))))))
    return np.float64(a) * ln if e > -127.0 else 0.0


@njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
def reduce_heads(A, lengths, first, dup_off, dup_k, h0, h1, w, w2, bos_d, bos2_d, ent, bos_sum, dup):
    """Fold one layer's patterns ``A`` [B, H, T, T] (float32) into the sums of heads ``h0:h1``.

    For every row ``b`` and scored query ``q`` in ``first .. lengths[b] - 1``, and every key
    ``k <= q`` at distance ``d = q - k``: ``w[h, d] += a`` and ``w2[h, d] += a * a``;
    ``ent[h] -= a ln a``. The key 0 (distance ``q``): ``bos_d[h, q]`` and ``bos2_d[h, q]`` add
    its weight and square, ``bos_sum[h]`` its weight. ``dup[h]`` adds the weights on the earlier
    copies of the query's token, keys ``dup_k[dup_off[b * T + q] : dup_off[b * T + q + 1]]``."""
    B, _, T, _ = A.shape
    for h in range(h0, h1):
        for b in range(B):
            for q in range(first, lengths[b]):
                row = A[b, h, q]
                e = 0.0
                for d in range(q + 1):
                    a32 = row[q - d]
                    a = np.float64(a32)
                    w[h, d] += a
                    w2[h, d] += a * a
                    e += xlogx(a32)
                ent[h] -= e
                a0 = np.float64(row[0])
                bos_d[h, q] += a0
                bos2_d[h, q] += a0 * a0
                bos_sum[h] += a0
                s = 0.0
                for j in range(dup_off[b * T + q], dup_off[b * T + q + 1]):
                    s += np.float64(row[dup_k[j]])
                dup[h] += s
