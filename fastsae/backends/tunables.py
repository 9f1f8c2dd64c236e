"""Every performance tunable of every backend, in one place, with its reason.

Nothing here changes what a kernel computes beyond float32 reduction order
(and most not even that: the row and tile sizes below are chosen so that
results do not depend on them, see each backend's docstring); they decide how
work is cut into blocks that fit the caches. Names say which backend and
which kernel a value is for: two backends that need different values for
"the same" idea get two names, never one name with two meanings.

Measured on: the 2-core development machines of this project (AMD EPYC with
AVX-512 and AVX512-BF16, 1 MiB L2 per core, 32 MiB shared L3; and Intel Xeon
with AVX-512 and AMX), OpenBLAS SkylakeX/Haswell kernels, paper size
N=4096, d_in=512, d_sae=8192. The measurements are in
``benchmarks/results_numba.md`` and ``benchmarks/results_cython.md``.
"""

from __future__ import annotations

# ------------------------------------------------------------------ numba
#: Rows per block of the Numba ReLU encoder (``encode_relu``,
#: ``encode_relu_sparse``, ``train_step``) and of JumpReLU's.
#: ``ROW_BLOCK * d_sae * 4`` bytes of pre-activations (8 MiB at d_sae=8192)
#: stay in the 32 MiB L3 between the product and its epilogue; larger blocks
#: amortize BLAS's packing of ``W_enc`` better (results_numba.md).
NUMBA_RELU_ROW_BLOCK = 256

#: Block grid of the Numba TopK encoders: each sgemm makes a
#: ``ROWS x COLS`` tile (8 MiB, kept in L3) that is selected from right
#: away. Taller than the ReLU blocks, so BLAS packs ``W_enc`` once per row
#: block; the column split keeps the tile in cache (measured in
#: results_numba.md: 1024 x 2048 beat 256 x 8192).
NUMBA_TOPK_ROW_BLOCK = 1024
NUMBA_TOPK_COL_BLOCK = 2048

#: Features per tile of the Numba ReLU backward's feature pass: 64 float32 =
#: 256 contiguous bytes of each ``W_enc`` row and of its moments per update,
#: as the TopK pass. Was 16 (one cache line): at paper size, L0 38, the pass
#: (``feature_adam``) took 86, 98, 115 ms at 16 against 65, 81, 83 ms at 64 in
#: three alternating runs on an AMD EPYC (2 cores, OpenBLAS SkylakeX, issue
#: 13's session; the "weight pass + Adam" line of ``python
#: benchmarks/bf16_steps.py --parts`` with this value edited, each value with
#: its own fresh ``NUMBA_CACHE_DIR``: Numba's cache does not see edits here): the
#: row pieces of a tile sit 32 KB apart, so wider pieces mean fewer pages and
#: cache lines touched per byte. Results do not depend on it (each feature's
#: sums run in their own order).
NUMBA_RELU_FEATURE_TILE = 64

#: Features per tile of the Numba TopK step's weight pass: 64 float32 = 256
#: contiguous bytes per row of ``W_enc`` and of each of its moments, which
#: lets Adam vectorize in the tile (results_numba.md).
NUMBA_TOPK_FEATURE_TILE = 64

#: Rows per block of the Numba TopK row pass: column sums are summed per
#: block, then over blocks in order (independent of the thread count).
NUMBA_TOPK_ROW_SUM_BLOCK = 64

#: Rows per block of the Numba column sums of ``[N, d]`` arrays
#: (``backward.column_sums_rows``): float64 partial sums per block, then
#: summed over blocks in order (independent of the thread count).
NUMBA_COLUMN_SUM_BLOCK = 64

#: Elements per parallel block of the Numba flat Adam update (``b_dec``):
#: big enough that a block is worth a thread, small enough to split.
NUMBA_ADAM_FLAT_BLOCK = 4096

#: First staging width (entries per row) of the Numba CSR encoder, before it
#: has learned one from a previous call's largest row (x1.5, power of two).
NUMBA_CSR_STAGE_START = 128
#: Upper bound of the CSR encoder's staging area, bytes.
NUMBA_CSR_STAGE_MAX_BYTES = 256 << 20

#: Codes (CSR or dense) with at least this fraction of their entries nonzero
#: are decoded by the Numba backend with BLAS, sparser ones by a
#: gather-accumulate through CSR (its ``N * L0 * d_in`` work beats the GEMM
#: below about 1/8 at paper size: benchmarks/RESULTS.md, "density"). Read at
#: call time.
NUMBA_DENSE_DECODE_MIN_DENSITY = 0.125

#: Features per block of the Numba dense ReLU path's weight pass
#: (``dense._feature_adam``): each block's two gradient GEMMs are
#: ``FB x N x d_in`` and ``d_in x N x FB``; bigger blocks amortize BLAS's
#: packing (paper size, one thread, CPU time: the pass took 2.45x one
#: encoder GEMM at 256 features, 2.28x at 512, 2.26x at 1024; floor 2.0x).
#: A fixed grid, so results do not depend on the threads.
NUMBA_DENSE_FEATURE_BLOCK = 512

#: Row blocks of the Numba dense path's row pass (``dense._row_pass``: the
#: ``x_hat`` and ``d_pre`` GEMMs): ``ceil(N / MIN_BLOCKS)`` rows, at most
#: ``MAX`` (paper size, one thread: 2.61x one encoder GEMM at 256 rows,
#: 2.38x at 1024; floor 2.0x); shape-only, and at least ``MIN_BLOCKS``
#: blocks so small batches still split over the cores.
NUMBA_DENSE_ROW_BLOCK_MAX = 1024
NUMBA_DENSE_ROW_MIN_BLOCKS = 8

#: Density (nonzeros / (N * d_sae)) from which the Numba ReLU ``train_step``
#: and ``gradients`` take the dense path (BLAS products over dense codes)
#: instead of the sparse one. Read at call time (tests set 0.0 to force
#: dense, 2.0 to force sparse). Measured crossover of ``train_step`` (AMD
#: EPYC, 2 cores, busy machine, so +-20%): about 0.075-0.09 at paper size
#: (L0 620-750 of 8192), about 0.12 at batch 512, d_in 384, d_sae 6144;
#: ``gradients`` about 0.11. One value between them; near the crossover the
#: two paths cost about the same (benchmarks/RESULTS.md, "Density").
NUMBA_RELU_DENSE_MIN_DENSITY = 0.09

#: Row blocks the Numba ReLU ``train_step`` encodes first to measure the
#: batch's density (``encode.encode_relu_adaptive``; they are kept, not
#: recomputed). A fixed count, never the thread count, so the path taken
#: does not depend on the threads; 2 = one block per core here (512 rows at
#: the default row block: the density of a few million entries).
NUMBA_RELU_PROBE_BLOCKS = 2

# JumpReLU training (fastsae/backends/numba/jumprelu.py).
#: Rows per block of the Numba JumpReLU training encoder (the ReLU
#: encoder's grid and reason: ``ROW_BLOCK x d_sae`` pre-activations in L3
#: between the product and the ``pre > lo`` compaction).
NUMBA_JUMPRELU_ROW_BLOCK = 256
#: Features per tile of the sparse JumpReLU step's weight pass (it is the
#: TopK step's kernel, ``backward.topk_feature_adam``; same reason).
NUMBA_JUMPRELU_FEATURE_TILE = 64
#: Candidate density (entries with ``pre > theta - bandwidth/2``, over
#: ``N * d_sae``) from which the Numba JumpReLU step and gradients take the
#: dense path (BLAS products over dense codes). Read at call time (tests set
#: 0.0 to force dense, 2.0 to force sparse).
NUMBA_JUMPRELU_DENSE_MIN_DENSITY = 0.09
#: Row blocks encoded first to measure that density (kept, not recomputed);
#: a fixed count, so the path never depends on the threads.
NUMBA_JUMPRELU_PROBE_BLOCKS = 2

# ------------------------------------------------------------------ cython
#: Encoder tile of the Cython ReLU encoders: ``ROWS x COLS`` floats
#: (256 x 512 = 512 KiB, half of a core's L2) computed by one sgemm; its
#: epilogue runs before the next tile. ``ROWS`` is also the row block of the
#: dense-codes sgemm decoder, ``COLS`` the feature tile of the top-k encoders.
#: (The compiled kernels' own block sizes, which size C buffers, are enums in
#: ``kernels/cython/*.pyx``: ``_FB``, ``_CB``, ``_CHUNK``, ``_LANES``.)
CYTHON_RELU_TILE_ROWS = 256
CYTHON_TILE_COLS = 512

#: Row tile of the Cython top-k encoders: 512 x 512 floats = 1 MiB, so each
#: sgemm repacks the row block's ``x - b_dec`` less often (measured ~5%
#: faster at paper size than 256 rows; the selection epilogue is cheap).
CYTHON_TOPK_TILE_ROWS = 512

#: Row tiles of the Cython encoders and of the dense-codes sgemm decoder are
#: ``min(ROWS, max(16, ceil(N / MIN_ROW_BLOCKS)))`` (one block's worth for
#: work below ``CYTHON_PARALLEL_MIN_WORK``, which runs on one thread): they
#: depend on the problem only, never on the thread count, because OpenBLAS
#: rounds a product differently for another row count (its edge kernels) and
#: results must not depend on the threads. The minimum block counts are the
#: split 2 threads used before (ReLU: one block per thread, more tasks come
#: from feature chunks; top-k: 4 blocks per thread, it has no feature
#: chunks), so small batches still run in parallel on 2-core machines, and
#: results equal 96df242's at 2 threads.
CYTHON_RELU_MIN_ROW_BLOCKS = 2
CYTHON_TOPK_MIN_ROW_BLOCKS = 8

#: Codes (CSR or dense) with at least this fraction of their entries nonzero
#: are decoded by the Cython backend with sgemm (CSR codes scattered into
#: dense row blocks first), sparser ones by a gather that skips zeros
#: (measured crossover about 0.125 at paper size, as Numba's). Read at call
#: time.
CYTHON_DENSE_DECODE_MIN_DENSITY = 0.125

#: Cython kernels with less work than this (multiply-adds or element visits)
#: run on one thread: waking the OpenMP team costs more than it saves (and on
#: a busy machine a descheduled worker can stall the team for a tick).
CYTHON_PARALLEL_MIN_WORK = 1 << 20

#: Density from which the Cython ReLU ``train_step`` and ``gradients`` take
#: the dense path; read at call time, measured as Numba's (crossovers within
#: the same ranges).
CYTHON_RELU_DENSE_MIN_DENSITY = 0.09

# Blocks of the Cython dense ReLU path (fastsae/backends/cython/dense.py,
# kernels/cython/dense.pyx) and of its dense encoder continuation; all
# depend on the shape only, so results do not depend on the thread count.

#: The dense backward's feature pass works on blocks of about
#: ``d_sae / CYTHON_DENSE_MIN_FEATURE_BLOCKS`` features (a multiple of 64,
#: clamped to ``[..._FEATURE_BLOCK_MIN, ..._FEATURE_BLOCK_MAX]``): each block
#: runs three sgemms over its rows, then Adam on its ``W_dec`` rows and
#: ``W_enc`` columns. Big blocks, because each sgemm's BLAS packing costs
#: about ``1/block`` of its product (paper size, one thread: the pass took
#: 4.0x the bare matmul with 256-feature blocks and 1024-row chunks,
#: 3.3-3.5x with 768-1024 features and 2048-4096 rows; three products'
#: floor 2.7x).
CYTHON_DENSE_MIN_FEATURE_BLOCKS = 8
CYTHON_DENSE_FEATURE_BLOCK_MIN = 256
CYTHON_DENSE_FEATURE_BLOCK_MAX = 1024
#: Rows per chunk of a feature block: the ``ROW_CHUNK x block`` ``d_pre``
#: tile (16 MiB per thread at 1024 features) is made, masked and summed,
#: then fed to the two gradient sgemms, which accumulate over the chunks in
#: order. At paper size one chunk (4096 rows) measured ~8% faster than two
#: (one thread, CPU time: 3.05x against 3.30x the bare matmul).
CYTHON_DENSE_ROW_CHUNK = 4096
#: Row blocks of the dense step's row pass (``x_hat = f @ W_dec``, one sgemm
#: each, ``K = d_sae``): about ``N / 8`` rows, clamped to ``[256, 1024]``.
CYTHON_DENSE_ROW_BLOCK_MIN = 256
CYTHON_DENSE_ROW_BLOCK_MAX = 1024
#: Row blocks of the dense CSR decoder (a ``rows x d_sae`` scatter buffer
#: and one sgemm per block): about ``N / 8`` rows, clamped to ``[64, 512]``.
CYTHON_DENSE_DECODE_ROWS_MIN = 64
CYTHON_DENSE_DECODE_ROWS_MAX = 512
#: Dense continuation of the ReLU step's encoder
#: (``cython.encode.encode_relu_switch``): at least ``MIN_TASKS`` tiles where
#: the shape allows, of at most ``MAX_ROWS`` rows and at least ``MIN_COLS``
#: features. Far bigger tiles than the CSR encoder's (whose tile must stay in
#: L2 for its compaction): a tile's BLAS packing costs about ``1/rows +
#: 1/cols`` of its product, and the dense epilogue streams (at paper size
#: 1.02x the bare matmul for 1024 x 8192 tiles against 1.18x for 256 x 512,
#: one thread).
CYTHON_DENSE_ENCODE_MIN_TASKS = 8
CYTHON_DENSE_ENCODE_MAX_ROWS = 1024
CYTHON_DENSE_ENCODE_MIN_COLS = 512

# JumpReLU training of the Cython backend (fastsae/backends/cython/jumprelu.py,
# kernels/cython/jumprelu.pyx); its dense feature pass uses the dense ReLU
# path's blocks (CYTHON_DENSE_*_FEATURE_BLOCK*, CYTHON_DENSE_ROW_CHUNK), its
# dense encoder continuation CYTHON_DENSE_ENCODE_*.

#: Row tile of the candidate encoder (tiles of ``ROWS x CYTHON_TILE_COLS``,
#: cut as ``CYTHON_RELU_TILE_ROWS`` is, shape-only; read at call time): 512
#: as the top-k encoders (paper size, 2 cores, loaded machine, interleaved
#: A/B: 1.09-1.18x the bare matmul against 1.15-1.25x at 256 rows; 1024 and
#: 2048 within the noise).
CYTHON_JUMPRELU_TILE_ROWS = 512
#: Candidate density (entries with ``pre > theta - bandwidth/2`` over
#: ``rows * d_sae``, measured on row block 0 of the encoder's grid) from which
#: the Cython JumpReLU step and gradients take the dense path. Read at call
#: time (tests set 0.0 to force dense, 2.0 to force sparse). Measured
#: crossover of ``train_step_jumprelu`` at paper size (2 loaded cores,
#: bandwidth 0.05, one step each path, 3 rounds): sparse/dense time 0.76 at
#: candidate density 0.05, 0.96 at 0.09, 1.14 at 0.14.
CYTHON_JUMPRELU_DENSE_MIN_DENSITY = 0.09
#: Bytes of the per-thread ``f`` buffer of the dense JumpReLU row pass
#: (``rows x d_sae`` float32; rows = this / (4 d_sae), at least 16): 8 MiB,
#: 256 rows at d_sae = 8192, each chunk one ``x_hat`` sgemm.
CYTHON_JUMPRELU_DENSE_ROW_BUFFER = 8 << 20

# ------------------------------------------------------------------ cuda
# Launch geometry of the CUDA kernels on a real GPU (under the simulator
# fastsae.backends.cuda.common uses a tiny test geometry instead). Not yet
# measured on a GPU (benchmarks/results_cuda_topk.md says why): these are the
# usual choices for NVIDIA GPUs from compute capability 7.0 on (32-thread
# warps, 32 shared-memory banks, 48 KiB of shared memory per block); they
# fix how work is cut, not what any kernel computes, except CUDA_BLOCK,
# CUDA_DOT_LANES and CUDA_COLSUM_ROWS, which fix the order of the float
# block sums, sparse dot products and column sums.

#: Threads of every 1-D block: 8 warps, enough to hide memory latency in the
#: row-per-block kernels while keeping their tree reductions short.
CUDA_BLOCK = 256
#: Most blocks of a grid-stride launch (the 1-D grid limit of old GPUs).
CUDA_GRID_CAP = 65535
#: Register-blocked SGEMM: a ``BM x BN`` block tile, ``BK`` deep per shared-memory
#: stage, ``TM x TN`` outputs per thread (16 x 16 = 256 threads; 64 float32
#: accumulators per thread stay in registers, checked by tests/test_cuda_sim.py).
CUDA_GEMM_BM = 128
CUDA_GEMM_BN = 128
CUDA_GEMM_BK = 8
CUDA_GEMM_TM = 8
CUDA_GEMM_TN = 8
#: Sparse dot products of the backward pass: one warp (``LANES`` threads)
#: per stored entry, ``GROUPS`` entries per block at once.
CUDA_DOT_LANES = 32
CUDA_DOT_GROUPS = 8
#: Transpose through shared memory: ``TILE x TILE`` tiles (one warp wide,
#: padded against bank conflicts), ``ROWS`` thread rows per block.
CUDA_TRANSPOSE_TILE = 32
CUDA_TRANSPOSE_ROWS = 8
#: Rows per chunk of the stable CSR -> CSC transposition (per-chunk feature
#: counts are int32 ``[N / CHUNK_ROWS, d_sae]``).
CUDA_CSC_CHUNK_ROWS = 64
#: Rows per partial column sum (bias gradient, batch mean).
CUDA_COLSUM_ROWS = 64
#: JumpReLU training: above this fraction of candidate entries (pre > theta -
#: bandwidth/2) per N x d_sae, the step takes the dense path (GEMMs for
#: decode, d_f, g_W_enc and g_W_dec) instead of the sparse backward. A guess
#: (the CPU backends measured about 0.09 for theirs), not yet measured on a GPU.
CUDA_JUMPRELU_DENSE_MIN_DENSITY = 0.05

# ------------------------------------------------------------------ bfloat16
#: TopK with ``precision="bf16"`` (``fastsae.backends.bf16``) takes, per row,
#: the ``k + max(BF16_TOPK_MARGIN_MIN, k // BF16_TOPK_MARGIN_FRACTION)``
#: largest bfloat16 pre-activations as candidates and re-selects the top ``k``
#: among their float32 values. The bf16 product's error is about 2^-8 of
#: ``sum_k |xc_k w_k|`` (both operands rounded to 8 significant bits), well
#: under the gap between a row's k-th and (k + k/4)-th largest pre-activation
#: of a trained SAE (``benchmarks/bf16_support.py`` counts the entries that
#: still differ from float32's selection). The recompute costs one float32 dot
#: product of length d_in per candidate, so the margin stays small.
BF16_TOPK_MARGIN_MIN = 8
BF16_TOPK_MARGIN_FRACTION = 4


def bf16_topk_candidates(k: int, d_sae: int) -> int:
    """Candidates per row of the bf16 TopK encoder (see ``BF16_TOPK_MARGIN_MIN``)."""
    k = min(int(k), int(d_sae))
    return min(int(d_sae), k + max(BF16_TOPK_MARGIN_MIN, k // BF16_TOPK_MARGIN_FRACTION))
