"""bfloat16 encoder kernels (``fastsae.backends.cython._bf16``): a thin shim over
the C kernels in ``kernels/c/bf16_encode.c`` (compiled into this extension by
``setup.py``), shared by the numba and cython backends through
:mod:`fastsae.backends.bf16`.

Every size the C code relies on is checked here, before ``nogil``: the C
kernels trust their pointers. The arrays come from :mod:`fastsae.backends.bf16`
(itself behind the validating front), so a failed check is a bug there, and
it raises ``ValueError`` rather than reading out of bounds.
"""

import numpy as np

from libc.stdint cimport int32_t, int64_t, uint16_t

cdef extern from "bf16_encode.h" nogil:
    ctypedef struct fs_bf16_result:
        pass
    int FS_BF16_EMULATED
    int FS_BF16_AVX512BF16
    int FS_BF16_GROUP_COLS
    int fs_bf16_has_avx512bf16()
    int fs_bf16_built_avx512bf16()
    int64_t fs_bf16_packed_size(int64_t d_in, int64_t d_sae)
    void fs_bf16_pack(const float *W, int64_t d_in, int64_t d_sae, uint16_t *Wp, float *WT,
                      int nthreads)
    fs_bf16_result *fs_bf16_encode(int path, const float *x, const float *b_dec, int64_t N,
                                   int64_t d_in, int64_t d_sae, const uint16_t *Wp,
                                   const float *WT, const float *b_enc, const float *thr,
                                   const float *cut_base, const float *cut_scale, int64_t k,
                                   int64_t m, int nthreads, int64_t *nnz)
    fs_bf16_result *fs_bf16_encode_candidates(int path, const float *x, const float *b_dec,
                                              int64_t N, int64_t d_in, int64_t d_sae,
                                              const uint16_t *Wp, const float *WT,
                                              const float *b_enc, int64_t K, int nthreads,
                                              int64_t *nnz)
    void fs_bf16_collect_candidates(fs_bf16_result *r, int64_t K, int64_t *counts,
                                    int64_t *npos, int32_t *cols, float *pre, float *values)
    void fs_bf16_collect(fs_bf16_result *r, int64_t *indptr, int32_t *indices, float *values)
    void fs_bf16_free(fs_bf16_result *r)

#: Path codes of the C kernels.
EMULATED = FS_BF16_EMULATED
AVX512BF16 = FS_BF16_AVX512BF16
GROUP_COLS = FS_BF16_GROUP_COLS


def has_avx512bf16():
    """Whether this CPU and OS run the AVX512-BF16 path (and it was built)."""
    return bool(fs_bf16_has_avx512bf16())


def built_avx512bf16():
    """Whether the compiler that built this extension knew AVX512-BF16."""
    return bool(fs_bf16_built_avx512bf16())


def packed_size(int64_t d_in, int64_t d_sae):
    """uint16 elements of the packed bfloat16 encoder for these sizes."""
    return int(fs_bf16_packed_size(d_in, d_sae))


def _need(bint ok, str what):
    if not ok:
        raise ValueError(f"bf16 kernel: {what}")


def pack(const float[:, ::1] W, int nthreads):
    """``W_enc [d_in, d_sae]`` float32 -> ``(Wp, WT)``: the bfloat16 panels
    (uint16, flat, see ``bf16_encode.h``) and the float32 transpose
    ``[d_sae, d_in]``, in one pass."""
    cdef int64_t d_in = W.shape[0], d_sae = W.shape[1]
    _need(d_in >= 1 and d_sae >= 1 and d_sae < 2**31, "W_enc must be non-empty")
    _need(nthreads >= 1, "nthreads must be >= 1")
    Wp = np.empty(fs_bf16_packed_size(d_in, d_sae), dtype=np.uint16)
    WT = np.empty((d_sae, d_in), dtype=np.float32)
    cdef uint16_t[::1] wp = Wp
    cdef float[:, ::1] wt = WT
    with nogil:
        fs_bf16_pack(&W[0, 0], d_in, d_sae, &wp[0], &wt[0, 0], nthreads)
    return Wp, WT


def _check_encode(int path, const float[:, ::1] x, const float[::1] b_dec,
                  const uint16_t[::1] Wp, const float[:, ::1] WT, const float[::1] b_enc,
                  int nthreads):
    cdef int64_t d_in = x.shape[1], d_sae = WT.shape[0]
    _need(path == FS_BF16_EMULATED or (path == FS_BF16_AVX512BF16 and fs_bf16_has_avx512bf16()),
          f"path {path} does not run on this CPU")
    _need(d_in >= 1 and d_sae >= 1 and d_sae < 2**31, "empty encoder")
    _need(WT.shape[1] == d_in, "WT must be [d_sae, d_in]")
    _need(b_dec.shape[0] == d_in, "b_dec must be [d_in]")
    _need(b_enc.shape[0] == d_sae, "b_enc must be [d_sae]")
    _need(Wp.shape[0] == fs_bf16_packed_size(d_in, d_sae), "Wp has the wrong size")
    _need(nthreads >= 1, "nthreads must be >= 1")


def encode_candidates(int path, const float[:, ::1] x, const float[::1] b_dec,
                      const uint16_t[::1] Wp, const float[:, ::1] WT, const float[::1] b_enc,
                      int64_t K, int nthreads):
    """BatchTopK candidates of the bf16 encoder: per row the ``K`` best
    positive bf16 pre-activations, sorted by (bf16 value desc, column asc).
    Returns ``(counts int64 [N], npos int64 [N], cols int32 [N, K], pre
    float32 [N, K], values float32 [N, K])``: row ``i``'s first ``counts[i]``
    entries are its candidates (``pre`` the bf16 product's pre-activations,
    ``values`` the float32 ones; the rest of the row is unset), ``npos[i]``
    its count of positive bf16 pre-activations."""
    cdef int64_t N = x.shape[0], d_in = x.shape[1], d_sae = WT.shape[0]
    _check_encode(path, x, b_dec, Wp, WT, b_enc, nthreads)
    _need(1 <= K <= d_sae, "need 1 <= K <= d_sae")
    cdef int64_t nnz = 0
    cdef fs_bf16_result *res
    cdef float dummy = 0
    cdef const float *xp = &x[0, 0] if N > 0 else &dummy
    with nogil:
        res = fs_bf16_encode_candidates(path, xp, &b_dec[0], N, d_in, d_sae, &Wp[0], &WT[0, 0],
                                        &b_enc[0], K, nthreads, &nnz)
    if res == NULL:
        raise MemoryError("bf16 encoder: out of memory")
    counts = np.empty(max(N, 1), dtype=np.int64)
    npos = np.empty(max(N, 1), dtype=np.int64)
    cols = np.empty((max(N, 1), K), dtype=np.int32)
    pre = np.empty((max(N, 1), K), dtype=np.float32)
    values = np.empty((max(N, 1), K), dtype=np.float32)
    cdef int64_t[::1] c = counts
    cdef int64_t[::1] p = npos
    cdef int32_t[:, ::1] cc = cols
    cdef float[:, ::1] pp = pre
    cdef float[:, ::1] vv = values
    with nogil:
        fs_bf16_collect_candidates(res, K, &c[0], &p[0], &cc[0, 0], &pp[0, 0], &vv[0, 0])
    return counts[:N], npos[:N], cols[:N], pre[:N], values[:N]


def encode(int path, const float[:, ::1] x, const float[::1] b_dec, const uint16_t[::1] Wp,
           const float[:, ::1] WT, const float[::1] b_enc, thr, int64_t k, int64_t m,
           int nthreads, cut=None):
    """CSR ``(indptr int64 [N+1], indices int32, values float32)`` of the bf16
    encoder: threshold mode when ``k == 0`` (``thr`` float32 ``[d_sae]`` or
    ``None`` for 0), TopK with ``m`` candidates per row otherwise. ``cut``
    (threshold mode, with ``thr``): ``(base, scale)`` float32 ``[d_sae]``
    each, the lowered bf16 cut of ``numerics.bf16_cut_margin`` (candidates
    ``pre_b > base - |x_i - b_dec| * scale``, kept where ``pre > thr``)."""
    cdef int64_t N = x.shape[0], d_in = x.shape[1], d_sae = WT.shape[0]
    cdef const float[::1] t, cb, cs
    cdef const float *tp = NULL
    cdef const float *cbp = NULL
    cdef const float *csp = NULL
    _check_encode(path, x, b_dec, Wp, WT, b_enc, nthreads)
    if k == 0:
        if thr is not None:
            t = thr
            _need(t.shape[0] == d_sae, "thr must be [d_sae]")
            tp = &t[0]
        if cut is not None:
            _need(thr is not None, "a lowered cut needs thr")
            _need(len(cut) == 2, "cut must be (base, scale)")
            cb = cut[0]
            cs = cut[1]
            _need(cb.shape[0] == d_sae and cs.shape[0] == d_sae,
                  "cut's base and scale must be [d_sae]")
            cbp = &cb[0]
            csp = &cs[0]
    else:
        _need(1 <= k <= m <= d_sae, "need 1 <= k <= m <= d_sae")
        _need(cut is None, "a lowered cut is for threshold mode (k == 0) only")
    cdef int64_t nnz = 0
    cdef fs_bf16_result *res
    # Empty views have no element 0: hand the C code a dummy pointer (never read, N == 0).
    cdef float dummy = 0
    cdef const float *xp = &x[0, 0] if N > 0 else &dummy
    with nogil:
        res = fs_bf16_encode(path, xp, &b_dec[0], N, d_in, d_sae, &Wp[0], &WT[0, 0],
                             &b_enc[0], tp, cbp, csp, k, m, nthreads, &nnz)
    if res == NULL:
        raise MemoryError("bf16 encoder: out of memory")
    indptr = np.empty(N + 1, dtype=np.int64)
    indices = np.empty(max(nnz, 1), dtype=np.int32)
    values = np.empty(max(nnz, 1), dtype=np.float32)
    cdef int64_t[::1] ip = indptr
    cdef int32_t[::1] ix = indices
    cdef float[::1] vv = values
    with nogil:
        fs_bf16_collect(res, &ip[0], &ix[0], &vv[0])
    return indptr, indices[:nnz], values[:nnz]
