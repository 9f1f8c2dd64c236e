"""Launch geometry, shared device helpers and small kernels of the CUDA backend.

Every kernel module of :mod:`fastsae.backends.cuda` takes its block and tile
sizes from here, so one switch moves the whole CUDA backend between two
geometries:

* On a real GPU: the ``CUDA_*`` values of :mod:`fastsae.backends.tunables`
  (256-thread blocks, 128x128 GEMM tiles with 8x8 outputs per thread, 32x32
  transpose tiles).
* Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, read when numba is
  first imported), every GPU thread is a Python thread and every
  ``syncthreads()`` is a thread switch, so the very same kernels run with
  8-thread blocks and 8x8 GEMM tiles. Tiny test shapes (sizes 1..20) then
  still cross every tile, chunk and block boundary the real geometry has.

Shared-memory array shapes must be compile-time constants in numba.cuda;
module-level ints like the ones below are frozen into each kernel when it
is compiled.

Host side: :func:`grid_for` / :func:`flat_grid` size grid-stride launches,
:func:`_single_block` makes a deliberate one-block launch, :func:`_zero`
clears a device array. :func:`transpose_kernel` serves the backward passes
and the skip transcoder's GEMMs (:mod:`.transcoder`).
"""

from __future__ import annotations

import warnings

import numpy as np
from numba import config, cuda

from .. import tunables as T

#: True when numba runs CUDA kernels in its Python simulator.
SIMULATOR = bool(config.ENABLE_CUDASIM)

if SIMULATOR:
    BLOCK = 8            # threads of every 1-D block
    GRID_CAP = 3         # grid-stride loops: at most this many blocks
    GEMM_BM = 8          # GEMM block tile rows
    GEMM_BN = 8          # GEMM block tile columns
    GEMM_BK = 4          # GEMM depth of one shared-memory stage
    GEMM_TM = 2          # output rows per thread
    GEMM_TN = 2          # output columns per thread
    LANES = 2            # sparse dot products: threads sharing one entry
    GROUPS = 4           # sparse dot products: entries per block at once
    TILE = 4             # transpose tile edge
    TILE_ROWS = 2        # transpose block rows
    CHUNK_ROWS = 2       # rows per chunk of the CSR -> CSC transposition
    COLSUM_ROWS = 3      # rows per partial column sum
else:
    BLOCK = T.CUDA_BLOCK
    GRID_CAP = T.CUDA_GRID_CAP
    GEMM_BM = T.CUDA_GEMM_BM
    GEMM_BN = T.CUDA_GEMM_BN
    GEMM_BK = T.CUDA_GEMM_BK
    GEMM_TM = T.CUDA_GEMM_TM
    GEMM_TN = T.CUDA_GEMM_TN
    LANES = T.CUDA_DOT_LANES
    GROUPS = T.CUDA_DOT_GROUPS
    TILE = T.CUDA_TRANSPOSE_TILE
    TILE_ROWS = T.CUDA_TRANSPOSE_ROWS
    CHUNK_ROWS = T.CUDA_CSC_CHUNK_ROWS
    COLSUM_ROWS = T.CUDA_COLSUM_ROWS

#: Shared ping-pong buffer of :func:`block_exclusive_scan` for BLOCK threads.
SCAN_SHARED = 2 * BLOCK
_TILE_COLS = TILE + 1  # padded transpose tile (shared-array shapes must be constants)

#: GEMM block shape: (x = columns, y = rows) of threads.
GEMM_TX = GEMM_BN // GEMM_TN
GEMM_TY = GEMM_BM // GEMM_TM
GEMM_THREADS = GEMM_TX * GEMM_TY
assert (GEMM_BM * GEMM_BK) % GEMM_THREADS == 0
assert (GEMM_BN * GEMM_BK) % GEMM_THREADS == 0
assert BLOCK & (BLOCK - 1) == 0 and LANES & (LANES - 1) == 0  # tree reductions


def grid_for(n: int, per_block: int = 1) -> int:
    """Blocks for a grid-stride loop over ``n`` items, ``per_block`` at a time."""
    return max(1, min(GRID_CAP, -(-int(n) // per_block)))


def flat_grid(n: int) -> int:
    """Blocks of ``BLOCK`` threads for a 1-D grid-stride loop over ``n`` items."""
    return grid_for(n, BLOCK)


def _single_block(kernel):
    """``kernel[1, BLOCK]``: a deliberate one-block launch (a short ordered
    pass such as a scan), so numba's low-occupancy warning is silenced for
    this configuration only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Grid size")
        return kernel[1, BLOCK]


def _flat(a):
    """The 1-D view of a C-contiguous device array."""
    return a.reshape(a.size)


def _zero(a):
    """Set every element of device array ``a`` to 0 (any shape)."""
    flat = _flat(a) if len(a.shape) > 1 else a
    fill_kernel[flat_grid(flat.shape[0]), BLOCK](flat, flat.dtype.type(0))


# ------------------------------------------------------------ device helpers
@cuda.jit(device=True)
def block_sum(sh, t, v):
    """Sum of ``v`` over the ``sh.shape[0]`` threads of a 1-D block.

    ``sh`` is a shared array of the accumulation dtype and of the block's
    size (a power of two); ``t`` is ``threadIdx.x``. Every thread gets the
    sum. Must be reached by all threads of the block; ends with a barrier so
    ``sh`` can be reused at once.
    """
    n = sh.shape[0]
    sh[t] = v
    cuda.syncthreads()
    s = n // 2
    while s > 0:
        if t < s:
            sh[t] += sh[t + s]
        cuda.syncthreads()
        s //= 2
    total = sh[0]
    cuda.syncthreads()
    return total


@cuda.jit(device=True)
def block_sum2(sh, t, a, b):
    """:func:`block_sum` of two values at once (one set of barriers).

    ``sh``: shared array ``(2, block size)``. Returns ``(sum a, sum b)``.
    """
    n = sh.shape[1]
    sh[0, t] = a
    sh[1, t] = b
    cuda.syncthreads()
    s = n // 2
    while s > 0:
        if t < s:
            sh[0, t] += sh[0, t + s]
            sh[1, t] += sh[1, t + s]
        cuda.syncthreads()
        s //= 2
    ta = sh[0, 0]
    tb = sh[1, 0]
    cuda.syncthreads()
    return ta, tb


@cuda.jit(device=True)
def block_exclusive_scan(sh, t, v):
    """Exclusive prefix sum of ``v`` over a 1-D block, and the block total.

    ``sh``: shared int64 array of twice the block's size (the two halves
    are ping-pong buffers, so each of the log2 Hillis-Steele steps needs one
    barrier); must be reached by all threads. Returns ``(sum of v over
    threads < t, sum over all threads)``.
    """
    n = sh.shape[0] // 2
    sh[t] = v
    cuda.syncthreads()
    src = 0
    off = 1
    while off < n:
        dst = n - src
        val = sh[src + t]
        if t >= off:
            val += sh[src + t - off]
        sh[dst + t] = val
        cuda.syncthreads()
        src = dst
        off *= 2
    incl = sh[src + t]
    total = sh[src + n - 1]
    cuda.syncthreads()
    return incl - v, total


# ------------------------------------------------------------ small kernels
@cuda.jit(cache=True)
def exclusive_scan_kernel(counts, out):
    """``out[0] = 0``, ``out[i + 1] = counts[0] + ... + counts[i]``.

    counts: int32/int64 ``[n]``; out: int64 ``[n + 1]``. Launch with ONE
    block of ``BLOCK`` threads: it walks the array in chunks of ``BLOCK``,
    carrying the running total (n is at most a few tens of thousands here:
    rows of a batch or features of an SAE).
    """
    sh = cuda.shared.array(SCAN_SHARED, np.int64)
    t = cuda.threadIdx.x
    n = counts.shape[0]
    if t == 0:
        out[0] = 0
    carry = 0
    for base in range(0, n, BLOCK):
        i = base + t
        v = 0
        if i < n:
            v = counts[i]
        excl, total = block_exclusive_scan(sh, t, v)
        if i < n:
            out[i + 1] = carry + excl + v
        carry += total


@cuda.jit(cache=True)
def sum_kernel(arr, out, slot):
    """``out[slot] = sum(arr)`` in float64 (arr: float32/float64 ``[n]``).

    Launch with ONE block of ``BLOCK`` threads; deterministic order.
    """
    sh = cuda.shared.array(BLOCK, np.float64)
    t = cuda.threadIdx.x
    acc = 0.0
    for i in range(t, arr.shape[0], BLOCK):
        acc += arr[i]
    total = block_sum(sh, t, acc)
    if t == 0:
        out[slot] = total


@cuda.jit(cache=True)
def fill_kernel(arr, value):
    """``arr[:] = value`` for a 1-D array (grid-stride; any grid)."""
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for i in range(start, arr.shape[0], step):
        arr[i] = value


@cuda.jit(cache=True)
def add_kernel(dst, src):
    """``dst[:] += src`` for 1-D arrays of equal length (grid-stride)."""
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for i in range(start, dst.shape[0], step):
        dst[i] += src[i]


@cuda.jit(cache=True)
def transpose_kernel(src, dst):
    """``dst = src.T``; src float32 ``[R, C]``, dst float32 ``[C, R]``.

    Grid ``(ceil(C / TILE), ceil(R / TILE))``, block ``(TILE, TILE_ROWS)``;
    the shared tile has one padding column against bank conflicts.
    """
    tile = cuda.shared.array((TILE, _TILE_COLS), np.float32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    c0 = cuda.blockIdx.x * TILE
    r0 = cuda.blockIdx.y * TILE
    R = src.shape[0]
    C = src.shape[1]
    for yy in range(ty, TILE, TILE_ROWS):
        r = r0 + yy
        c = c0 + tx
        if r < R and c < C:
            tile[yy, tx] = src[r, c]
    cuda.syncthreads()
    for yy in range(ty, TILE, TILE_ROWS):
        r = c0 + yy  # row of dst = column of src
        c = r0 + tx
        if r < C and c < R:
            dst[r, c] = tile[tx, yy]
