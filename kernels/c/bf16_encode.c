/* bfloat16 encoder kernels (see bf16_encode.h for the layouts and the contract).
 *
 * Structure of one call: the rows are cut into blocks of FS_MB rows (a
 * multiple of the micro-tile's FS_MR rows), one OpenMP task per block.  A
 * block converts its rows of x - b_dec to bfloat16 once (round to nearest
 * even) and keeps them in float32 too; then for every group of 64 features it
 * computes FS_MR x 64 tiles of the bf16 product over the whole d_in with
 * float32 accumulators (24 zmm registers on the AVX512-BF16 path) and runs the
 * selection on the tile at once: the N x d_sae pre-activations are never
 * written.  At the end of the block every candidate's pre-activation is
 * recomputed in float32 (a dot product of x - b_dec with a row of W_enc's
 * transpose) and the final selection is made on those values.
 *
 * Every output entry is computed by one thread in a fixed order, so results
 * do not depend on the thread count.  The AVX512-BF16 functions carry their
 * own target attribute, so a portable build (no -march) still compiles them
 * and only calls them when CPUID and the OS say the CPU runs them.
 */
#include "bf16_encode.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && (__GNUC__ >= 10) && \
    (defined(__x86_64__) || defined(__i386__))
#define FS_HAVE_AVX512BF16 1
#include <immintrin.h>
#elif defined(__clang__) && (__clang_major__ >= 11) && (defined(__x86_64__) || defined(__i386__))
#define FS_HAVE_AVX512BF16 1
#include <immintrin.h>
#else
#define FS_HAVE_AVX512BF16 0
#endif

#define FS_MR 6
#define FS_NP 4
#define FS_NC (FS_NP * 16)
/* Rows per block, at most: 32 micro-tiles.  The block's bf16 rows (FS_MB *
 * d_in * 2 bytes: 192 KB at d_in 512), its float32 rows (384 KB) and one
 * group's panels (64 KB) stay in the 1 MB L2 while the block sweeps the
 * features; taller blocks read each selected feature's float32 column for
 * more rows at once (fs_recompute_block).  Fewer rows per block when there
 * would be under 4 blocks per thread, so the threads stay busy; results do
 * not depend on the block size. */
#define FS_MB (32 * FS_MR)

/* ------------------------------------------------------------ bfloat16 */
/* fs_to_bf16 is in bf16_encode.h */
static inline float fs_from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ------------------------------------------------------------ CPU features */
int fs_bf16_built_avx512bf16(void) { return FS_HAVE_AVX512BF16; }

int fs_bf16_has_avx512bf16(void) {
#if FS_HAVE_AVX512BF16
    /* libgcc's cpu model checks XCR0 for the AVX-512 state as well as CPUID. */
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

static inline int64_t fs_k2(int64_t d_in) { return (d_in + 1) / 2; }
static inline int64_t fs_groups(int64_t d_sae) { return (d_sae + FS_NC - 1) / FS_NC; }

/* ------------------------------------------------------------ packing */
void fs_bf16_pack(const float *W, int64_t d_in, int64_t d_sae, uint16_t *Wp, float *WT,
                  int nthreads) {
    const int64_t K2 = fs_k2(d_in), n_panels = fs_groups(d_sae) * FS_NP;
    int64_t p;
    (void)nthreads;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (p = 0; p < n_panels; ++p) {
        uint16_t *dst = Wp + p * K2 * 32;
        const int64_t j0 = p * 16;
        for (int64_t q = 0; q < K2; ++q) {
            for (int c = 0; c < 16; ++c) {
                const int64_t j = j0 + c;
                for (int e = 0; e < 2; ++e) {
                    const int64_t kk = 2 * q + e;
                    float w = (j < d_sae && kk < d_in) ? W[kk * d_sae + j] : 0.0f;
                    dst[(q * 16 + c) * 2 + e] = fs_to_bf16(w);
                    if (j < d_sae && kk < d_in) WT[j * d_in + kk] = w;
                }
            }
        }
    }
}

/* ------------------------------------------------------------ micro-kernels */
/* C[r][c] = sum_k A[r][k] * B[k][c] for FS_MR rows and FS_NC columns; A is
 * bf16 rows of lda elements (pairs of k adjacent), B the group's FS_NP panels. */
static void fs_mk_emulated(const uint16_t *A, int64_t lda, const uint16_t *B, int64_t K2,
                           float *C) {
    float acc[FS_MR][FS_NC];
    memset(acc, 0, sizeof(acc));
    for (int64_t q = 0; q < K2; ++q) {
        for (int p = 0; p < FS_NP; ++p) {
            const uint16_t *b = B + ((int64_t)p * K2 + q) * 32;
            float lo[16], hi[16];
            for (int c = 0; c < 16; ++c) {
                lo[c] = fs_from_bf16(b[2 * c]);
                hi[c] = fs_from_bf16(b[2 * c + 1]);
            }
            for (int r = 0; r < FS_MR; ++r) {
                const float a0 = fs_from_bf16(A[r * lda + 2 * q]);
                const float a1 = fs_from_bf16(A[r * lda + 2 * q + 1]);
                float *o = acc[r] + p * 16;
                for (int c = 0; c < 16; ++c) o[c] = (o[c] + a0 * lo[c]) + a1 * hi[c];
            }
        }
    }
    memcpy(C, acc, sizeof(acc));
}

#if FS_HAVE_AVX512BF16
#define FS_TARGET __attribute__((target("avx512f,avx512bf16")))

FS_TARGET static void fs_mk_avx512bf16(const uint16_t *A, int64_t lda, const uint16_t *B,
                                       int64_t K2, float *C) {
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c03 = c00;
    __m512 c10 = c00, c11 = c00, c12 = c00, c13 = c00;
    __m512 c20 = c00, c21 = c00, c22 = c00, c23 = c00;
    __m512 c30 = c00, c31 = c00, c32 = c00, c33 = c00;
    __m512 c40 = c00, c41 = c00, c42 = c00, c43 = c00;
    __m512 c50 = c00, c51 = c00, c52 = c00, c53 = c00;
    const uint16_t *b0 = B, *b1 = B + K2 * 32, *b2 = B + 2 * K2 * 32, *b3 = B + 3 * K2 * 32;
    const uint16_t *a0 = A, *a1 = A + lda, *a2 = A + 2 * lda, *a3 = A + 3 * lda,
                   *a4 = A + 4 * lda, *a5 = A + 5 * lda;
    for (int64_t q = 0; q < K2; ++q) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)(b0 + q * 32));
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void *)(b1 + q * 32));
        const __m512bh w2 = (__m512bh)_mm512_loadu_si512((const void *)(b2 + q * 32));
        const __m512bh w3 = (__m512bh)_mm512_loadu_si512((const void *)(b3 + q * 32));
        int32_t s;
        __m512bh v;
#define FS_ROW(a, x0, x1, x2, x3)                              \
    memcpy(&s, (a) + 2 * q, 4);                                \
    v = (__m512bh)_mm512_set1_epi32(s);                        \
    x0 = _mm512_dpbf16_ps(x0, v, w0);                          \
    x1 = _mm512_dpbf16_ps(x1, v, w1);                          \
    x2 = _mm512_dpbf16_ps(x2, v, w2);                          \
    x3 = _mm512_dpbf16_ps(x3, v, w3);
        FS_ROW(a0, c00, c01, c02, c03)
        FS_ROW(a1, c10, c11, c12, c13)
        FS_ROW(a2, c20, c21, c22, c23)
        FS_ROW(a3, c30, c31, c32, c33)
        FS_ROW(a4, c40, c41, c42, c43)
        FS_ROW(a5, c50, c51, c52, c53)
#undef FS_ROW
    }
#define FS_STORE(r, x0, x1, x2, x3)              \
    _mm512_storeu_ps(C + (r) * FS_NC + 0, x0);   \
    _mm512_storeu_ps(C + (r) * FS_NC + 16, x1);  \
    _mm512_storeu_ps(C + (r) * FS_NC + 32, x2);  \
    _mm512_storeu_ps(C + (r) * FS_NC + 48, x3);
    FS_STORE(0, c00, c01, c02, c03)
    FS_STORE(1, c10, c11, c12, c13)
    FS_STORE(2, c20, c21, c22, c23)
    FS_STORE(3, c30, c31, c32, c33)
    FS_STORE(4, c40, c41, c42, c43)
    FS_STORE(5, c50, c51, c52, c53)
#undef FS_STORE
}
#endif

/* ------------------------------------------------------------ per-row state */
typedef struct {
    int32_t *col;
    float *val;
    float *pre;  /* BatchTopK candidates: the bf16 pre-activations (val: float32) */
    int64_t n, cap;
    int64_t npos; /* BatchTopK candidates: the row's positive bf16 pre-activations */
    float cut;   /* TopK: admission cut, valid when has_cut */
    int has_cut;
} fs_list;

struct fs_bf16_result {
    int64_t N;
    fs_list *rows;
};

static int fs_push(fs_list *l, int32_t col, float val) {
    if (l->n == l->cap) {
        int64_t cap = l->cap ? 2 * l->cap : 32;
        int32_t *c = (int32_t *)realloc(l->col, (size_t)cap * sizeof(int32_t));
        if (!c) return 0;
        l->col = c;
        float *v = (float *)realloc(l->val, (size_t)cap * sizeof(float));
        if (!v) return 0;
        l->val = v;
        l->cap = cap;
    }
    l->col[l->n] = col;
    l->val[l->n] = val;
    l->n++;
    return 1;
}

/* TopK candidates: an unordered buffer of up to 2m + 16 entries and an
 * admission cut.  When the buffer fills, the m best are moved to its front
 * (a selection, linear time) and the cut becomes the m-th best value; only
 * values strictly above it are admitted from then on.  Columns of a row arrive
 * in increasing order, so a later entry equal to the cut is worse than the
 * entry holding it (ties keep the lower index) and is rightly refused.
 * O(1) per admitted entry plus a linear selection per fill.  Measured against
 * a binary min-heap of m entries (perf, paper size, one thread, k 32): the
 * same encoder time within noise; buffers of 4m and 8m did not help either.
 * The admissions themselves (about m ln(d_sae / m) per row) are the cost. */
static inline int fs_better(float va, int32_t ca, float vb, int32_t cb) {
    return va > vb || (va == vb && ca < cb);
}

/* Reorder (v, c)[0:n] so that the m best (value desc, column asc; keys are
 * unique, the columns being distinct) come first, the m-th best at m - 1. */
static void fs_select_best(float *v, int32_t *c, int64_t n, int64_t m) {
    int64_t lo = 0, hi = n - 1;
    const int64_t target = m - 1;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        /* median of three as the pivot */
        int64_t a = lo, b = mid, d = hi, t;
        if (fs_better(v[b], c[b], v[a], c[a])) { t = a; a = b; b = t; }
        if (fs_better(v[d], c[d], v[b], c[b])) { t = b; b = d; d = t; }
        if (fs_better(v[b], c[b], v[a], c[a])) { t = a; a = b; b = t; }
        const float pv = v[b];
        const int32_t pc = c[b];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (fs_better(v[i], c[i], pv, pc)) ++i;
            while (fs_better(pv, pc, v[j], c[j])) --j;
            if (i <= j) {
                float tv = v[i]; v[i] = v[j]; v[j] = tv;
                int32_t tc = c[i]; c[i] = c[j]; c[j] = tc;
                ++i;
                --j;
            }
        }
        if (target <= j) hi = j;
        else if (target >= i) lo = i;
        else break; /* target holds the pivot */
    }
}

static inline void fs_buf_offer(fs_list *l, int64_t m, float val, int32_t col) {
    l->col[l->n] = col;
    l->val[l->n] = val;
    if (++l->n == l->cap) {
        fs_select_best(l->val, l->col, l->n, m);
        l->n = m;
        l->cut = l->val[m - 1];
        l->has_cut = 1;
    }
}

/* The row's m candidates at the end of the sweep. */
static inline void fs_buf_finish(fs_list *l, int64_t m) {
    if (l->n > m) {
        fs_select_best(l->val, l->col, l->n, m);
        l->n = m;
    }
}

/* ------------------------------------------------------------ epilogues */
/* Tile C (FS_MR x FS_NC, rows r < nr valid, columns j0 + c < d_sae valid). */
/* cb, cs (threshold mode, both or neither): the lowered bf16 cut, row r's
 * entry j a candidate where v > cb[j] - rn[r] * cs[j] (one rounding, as the
 * AVX-512 epilogue's fnmadd), rn the block rows' norms; without them, thr. */
static int fs_epi_scalar(const float *C, int nr, int64_t j0, int64_t d_sae, const float *b_enc,
                         const float *thr, const float *cb, const float *cs, const float *rn,
                         int64_t k, int64_t m, int batch, fs_list *rows) {
    const int64_t nc = d_sae - j0 < FS_NC ? d_sae - j0 : FS_NC;
    for (int r = 0; r < nr; ++r) {
        fs_list *l = rows + r;
        for (int64_t c = 0; c < nc; ++c) {
            const int64_t j = j0 + c;
            const float v = C[r * FS_NC + c] + b_enc[j];
            if (batch && v > 0.0f) l->npos++;
            if (k == 0) {
                const float t = cs ? fmaf(-rn[r], cs[j], cb[j]) : (thr ? thr[j] : 0.0f);
                if (v > t && !fs_push(l, (int32_t)j, v)) return 0;
            } else if (v == v && (!l->has_cut || v > l->cut)) { /* NaN never passes */
                fs_buf_offer(l, m, v, (int32_t)j);
            }
        }
    }
    return 1;
}

#if FS_HAVE_AVX512BF16
/* The same selection with the comparisons 16 lanes at a time: a tile is 384
 * entries of which a handful pass, so only the mask's set bits are visited. */
FS_TARGET static int fs_epi_avx512(const float *C, int nr, int64_t j0, int64_t d_sae,
                                   const float *b_enc, const float *thr, const float *cb,
                                   const float *cs, const float *rn, int64_t k, int64_t m,
                                   int batch, fs_list *rows) {
    if (d_sae - j0 < FS_NC)
        return fs_epi_scalar(C, nr, j0, d_sae, b_enc, thr, cb, cs, rn, k, m, batch, rows);
    __m512 bias[FS_NP], t[FS_NP], sc[FS_NP];
    for (int p = 0; p < FS_NP; ++p) {
        bias[p] = _mm512_loadu_ps(b_enc + j0 + 16 * p);
        t[p] = cs ? _mm512_loadu_ps(cb + j0 + 16 * p)
                  : thr ? _mm512_loadu_ps(thr + j0 + 16 * p) : _mm512_setzero_ps();
        sc[p] = cs ? _mm512_loadu_ps(cs + j0 + 16 * p) : _mm512_setzero_ps();
    }
    for (int r = 0; r < nr; ++r) {
        fs_list *l = rows + r;
        const __m512 rr = _mm512_set1_ps(cs ? rn[r] : 0.0f);
        for (int p = 0; p < FS_NP; ++p) {
            __m512 v = _mm512_add_ps(_mm512_loadu_ps(C + r * FS_NC + 16 * p), bias[p]);
            if (batch)
                l->npos += __builtin_popcount(
                    (unsigned)_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ));
            /* TopK before its first cut takes everything but NaN; NaN never passes. */
            __mmask16 msk;
            if (k == 0)
                msk = _mm512_cmp_ps_mask(v, cs ? _mm512_fnmadd_ps(rr, sc[p], t[p]) : t[p],
                                         _CMP_GT_OQ);
            else if (!l->has_cut) msk = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
            else msk = _mm512_cmp_ps_mask(v, _mm512_set1_ps(l->cut), _CMP_GT_OQ);
            if (!msk) continue;
            float vals[16];
            _mm512_storeu_ps(vals, v);
            while (msk) {
                const int b = __builtin_ctz(msk);
                msk &= msk - 1;
                const int64_t j = j0 + 16 * p + b;
                if (k == 0) {
                    if (!fs_push(l, (int32_t)j, vals[b])) return 0;
                } else if (!l->has_cut || vals[b] > l->cut) { /* the cut may have risen */
                    fs_buf_offer(l, m, vals[b], (int32_t)j);
                }
            }
        }
    }
    return 1;
}
#endif

/* ------------------------------------------------------------ float32 recompute */
static float fs_dot(const float *a, const float *b, int64_t n) {
    float s[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; ++l) s[l] += a[i + l] * b[i + l];
    float tail = 0.0f;
    for (; i < n; ++i) tail += a[i] * b[i];
    for (int w = 8; w >= 1; w >>= 1)
        for (int l = 0; l < w; ++l) s[l] += s[l + w];
    return s[0] + tail;
}

typedef struct {
    float v;
    int32_t c;
} fs_pair;

static int fs_by_value(const void *pa, const void *pb) { /* value desc, column asc */
    const fs_pair *a = (const fs_pair *)pa, *b = (const fs_pair *)pb;
    if (a->v > b->v) return -1;
    if (a->v < b->v) return 1;
    return (a->c > b->c) - (a->c < b->c);
}

static int fs_by_col(const void *pa, const void *pb) {
    const fs_pair *a = (const fs_pair *)pa, *b = (const fs_pair *)pb;
    return (a->c > b->c) - (a->c < b->c);
}

/* The block's candidates in feature order: each feature's float32 column (a
 * 2 KB row of W_enc's transpose at d_in 512) is read once per block and dotted
 * with every block row that selected it, and the columns are visited in
 * increasing address order, which the hardware prefetcher follows.  Row by
 * row instead, each candidate would fetch its column again: N * L0 scattered
 * 2 KB reads per call, several times the bytes.  cnt: d_sae + 1 counters;
 * order: 2 * (total candidates) int32 (row, position). */
static int fs_recompute_block(fs_list *rows, int64_t mb, const float *xf, const float *WT,
                              int64_t d_in, int64_t d_sae, const float *b_enc, int64_t *cnt) {
    int64_t total = 0;
    for (int64_t r = 0; r < mb; ++r) total += rows[r].n;
    if (total == 0) return 1;
    int32_t *order = (int32_t *)malloc((size_t)total * 2 * sizeof(int32_t));
    if (!order) return 0;
    memset(cnt, 0, (size_t)(d_sae + 1) * sizeof(int64_t));
    for (int64_t r = 0; r < mb; ++r)
        for (int64_t i = 0; i < rows[r].n; ++i) cnt[rows[r].col[i] + 1]++;
    for (int64_t j = 0; j < d_sae; ++j) cnt[j + 1] += cnt[j];
    for (int64_t r = 0; r < mb; ++r)
        for (int64_t i = 0; i < rows[r].n; ++i) {
            const int64_t o = cnt[rows[r].col[i]]++;
            order[2 * o] = (int32_t)r;
            order[2 * o + 1] = (int32_t)i;
        }
    /* cnt[j] is now the end of feature j's run */
    int64_t o = 0;
    for (int64_t j = 0; j < d_sae; ++j) {
        const float *w = WT + j * d_in;
        for (; o < cnt[j]; ++o) {
            fs_list *l = rows + order[2 * o];
            l->val[order[2 * o + 1]] = fs_dot(xf + (int64_t)order[2 * o] * d_in, w, d_in) + b_enc[j];
        }
    }
    free(order);
    return 1;
}

typedef struct {
    float b, v;
    int32_t c;
} fs_triple;

static int fs_by_bf16(const void *pa, const void *pb) { /* bf16 value desc, column asc */
    const fs_triple *a = (const fs_triple *)pa, *b = (const fs_triple *)pb;
    if (a->b > b->b) return -1;
    if (a->b < b->b) return 1;
    return (a->c > b->c) - (a->c < b->c);
}

/* BatchTopK candidates: sorted by (bf16 value desc, column asc), the order
 * the batch selection (fastsae/backends/bf16.py) walks them in. */
static int fs_sort_candidates(fs_list *l) {
    const int64_t n = l->n;
    if (n == 0) return 1;
    fs_triple *p = (fs_triple *)malloc((size_t)n * sizeof(fs_triple));
    if (!p) return 0;
    for (int64_t i = 0; i < n; ++i) {
        p[i].b = l->pre[i];
        p[i].v = l->val[i];
        p[i].c = l->col[i];
    }
    qsort(p, (size_t)n, sizeof(fs_triple), fs_by_bf16);
    for (int64_t i = 0; i < n; ++i) {
        l->pre[i] = p[i].b;
        l->val[i] = p[i].v;
        l->col[i] = p[i].c;
    }
    free(p);
    return 1;
}

/* Replace a row's candidates (values already float32) by the final entries,
 * sorted by column. */
static int fs_finish_row(fs_list *l, const float *thr, int64_t k) {
    if (k == 0) { /* candidates are in column order already */
        int64_t w = 0;
        for (int64_t i = 0; i < l->n; ++i) {
            const int32_t j = l->col[i];
            if (l->val[i] > (thr ? thr[j] : 0.0f)) {
                l->col[w] = j;
                l->val[w] = l->val[i];
                ++w;
            }
        }
        l->n = w;
        return 1;
    }
    const int64_t n = l->n;
    if (n == 0) return 1;
    fs_pair *p = (fs_pair *)malloc((size_t)n * sizeof(fs_pair));
    if (!p) return 0;
    for (int64_t i = 0; i < n; ++i) {
        p[i].c = l->col[i];
        p[i].v = l->val[i];
    }
    qsort(p, (size_t)n, sizeof(fs_pair), fs_by_value);
    int64_t keep = n < k ? n : k, w = 0;
    for (int64_t i = 0; i < keep; ++i)
        if (p[i].v > 0.0f) p[w++] = p[i];
    qsort(p, (size_t)w, sizeof(fs_pair), fs_by_col);
    for (int64_t i = 0; i < w; ++i) {
        l->col[i] = p[i].c;
        l->val[i] = p[i].v;
    }
    l->n = w;
    free(p);
    return 1;
}

/* ------------------------------------------------------------ one call */
void fs_bf16_free(fs_bf16_result *r) {
    if (!r) return;
    if (r->rows) {
        for (int64_t i = 0; i < r->N; ++i) {
            free(r->rows[i].col);
            free(r->rows[i].val);
            free(r->rows[i].pre);
        }
        free(r->rows);
    }
    free(r);
}

/* batch: BatchTopK candidates (k == m == the buffer width K): per row the K
 * best positive bf16 pre-activations, kept with their float32 values. */
static fs_bf16_result *fs_encode(int path, const float *x, const float *b_dec, int64_t N,
                                 int64_t d_in, int64_t d_sae, const uint16_t *Wp,
                                 const float *WT, const float *b_enc, const float *thr,
                                 const float *cb, const float *cs, int64_t k, int64_t m,
                                 int batch, int nthreads, int64_t *nnz) {
    fs_bf16_result *res = (fs_bf16_result *)calloc(1, sizeof(fs_bf16_result));
    if (!res) return NULL;
    res->N = N;
    res->rows = (fs_list *)calloc((size_t)(N > 0 ? N : 1), sizeof(fs_list));
    if (!res->rows) { free(res); return NULL; }
    if (k > 0) { /* reserve each row's candidate buffer */
        const int64_t cap = 2 * m + 16;
        for (int64_t i = 0; i < N; ++i) {
            res->rows[i].col = (int32_t *)malloc((size_t)cap * sizeof(int32_t));
            res->rows[i].val = (float *)malloc((size_t)cap * sizeof(float));
            res->rows[i].cap = cap;
            if (!res->rows[i].col || !res->rows[i].val) { fs_bf16_free(res); return NULL; }
            if (batch) { /* only positive bf16 values are admitted */
                res->rows[i].has_cut = 1;
                res->rows[i].cut = 0.0f;
            }
        }
    }
#if FS_HAVE_AVX512BF16
    const int avx = path == FS_BF16_AVX512BF16;
#else
    const int avx = 0;
    (void)path;
#endif
    const int64_t K2 = fs_k2(d_in), lda = 2 * K2, n_groups = fs_groups(d_sae);
    int64_t mb_rows = (N + 4 * (int64_t)nthreads - 1) / (4 * (int64_t)nthreads);
    mb_rows = (mb_rows + FS_MR - 1) / FS_MR * FS_MR;
    if (mb_rows > FS_MB) mb_rows = FS_MB;
    if (mb_rows < FS_MR) mb_rows = FS_MR;
    const int64_t MB = mb_rows, n_blocks = (N + MB - 1) / MB;
    int failed = 0;
    int64_t blk;
    (void)nthreads;
#pragma omp parallel num_threads(nthreads)
    {
        uint16_t *A = (uint16_t *)aligned_alloc(64, (size_t)((FS_MB * lda * 2 + 63) / 64 * 64));
        float *xf = (float *)malloc((size_t)(FS_MB * (d_in > 0 ? d_in : 1)) * sizeof(float));
        float *C = (float *)aligned_alloc(64, FS_MR * FS_NC * sizeof(float));
        int64_t *cnt = (int64_t *)malloc((size_t)(d_sae + 1) * sizeof(int64_t));
        float *rn = (float *)malloc(FS_MB * sizeof(float));
        int ok = A && xf && C && cnt && rn;
#pragma omp for schedule(dynamic, 1)
        for (blk = 0; blk < n_blocks; ++blk) {
            if (!ok) continue;
            const int64_t i0 = blk * MB;
            const int64_t mb = N - i0 < MB ? N - i0 : MB;
            const int64_t mbp = (mb + FS_MR - 1) / FS_MR * FS_MR;
            for (int64_t r = 0; r < mbp; ++r) {
                uint16_t *a = A + r * lda;
                for (int64_t q = 0; q < lda; ++q) a[q] = 0;
                if (r >= mb) continue;
                const float *xr = x + (i0 + r) * d_in;
                float *xo = xf + r * d_in;
                double sq = 0.0;
                for (int64_t q = 0; q < d_in; ++q) {
                    xo[q] = xr[q] - b_dec[q];
                    a[q] = fs_to_bf16(xo[q]);
                    sq += (double)xo[q] * xo[q];
                }
                /* rounded up, as numerics.bf16_row_norms: the margin needs >= |xc_i| */
                rn[r] = (float)(sqrt(sq) * (1.0 + 0x1p-22));
            }
            fs_list *rows = res->rows + i0;
            for (int64_t g = 0; g < n_groups && ok; ++g) {
                const uint16_t *B = Wp + g * FS_NP * K2 * 32;
                for (int64_t r6 = 0; r6 < mbp && ok; r6 += FS_MR) {
                    const int nr = (int)(mb - r6 < FS_MR ? mb - r6 : FS_MR);
#if FS_HAVE_AVX512BF16
                    if (avx) {
                        fs_mk_avx512bf16(A + r6 * lda, lda, B, K2, C);
                        ok = fs_epi_avx512(C, nr, g * FS_NC, d_sae, b_enc, thr, cb, cs,
                                           rn + r6, k, m, batch, rows + r6);
                        continue;
                    }
#endif
                    fs_mk_emulated(A + r6 * lda, lda, B, K2, C);
                    ok = fs_epi_scalar(C, nr, g * FS_NC, d_sae, b_enc, thr, cb, cs, rn + r6, k,
                                       m, batch, rows + r6);
                }
            }
            if (k > 0)
                for (int64_t r = 0; r < mb; ++r) fs_buf_finish(rows + r, m);
            for (int64_t r = 0; r < mb && ok && batch; ++r) { /* keep the bf16 values */
                fs_list *l = rows + r;
                l->pre = (float *)malloc((size_t)(l->n > 0 ? l->n : 1) * sizeof(float));
                if (!l->pre) ok = 0;
                else if (l->n) memcpy(l->pre, l->val, (size_t)l->n * sizeof(float));
            }
            if (ok) ok = fs_recompute_block(rows, mb, xf, WT, d_in, d_sae, b_enc, cnt);
            for (int64_t r = 0; r < mb && ok; ++r)
                ok = batch ? fs_sort_candidates(rows + r) : fs_finish_row(rows + r, thr, k);
        }
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
        free(A);
        free(xf);
        free(C);
        free(cnt);
        free(rn);
    }
    if (failed) { fs_bf16_free(res); return NULL; }
    int64_t total = 0;
    for (int64_t i = 0; i < N; ++i) total += res->rows[i].n;
    *nnz = total;
    return res;
}

fs_bf16_result *fs_bf16_encode(int path, const float *x, const float *b_dec, int64_t N,
                               int64_t d_in, int64_t d_sae, const uint16_t *Wp,
                               const float *WT, const float *b_enc, const float *thr,
                               const float *cut_base, const float *cut_scale, int64_t k,
                               int64_t m, int nthreads, int64_t *nnz) {
    return fs_encode(path, x, b_dec, N, d_in, d_sae, Wp, WT, b_enc, thr, cut_base, cut_scale, k,
                     m, 0, nthreads, nnz);
}

fs_bf16_result *fs_bf16_encode_candidates(int path, const float *x, const float *b_dec,
                                          int64_t N, int64_t d_in, int64_t d_sae,
                                          const uint16_t *Wp, const float *WT,
                                          const float *b_enc, int64_t K, int nthreads,
                                          int64_t *nnz) {
    return fs_encode(path, x, b_dec, N, d_in, d_sae, Wp, WT, b_enc, NULL, NULL, NULL, K, K, 1,
                     nthreads, nnz);
}

void fs_bf16_collect_candidates(fs_bf16_result *r, int64_t K, int64_t *counts, int64_t *npos,
                                int32_t *cols, float *pre, float *values) {
    for (int64_t i = 0; i < r->N; ++i) {
        const fs_list *l = r->rows + i;
        counts[i] = l->n;
        npos[i] = l->npos;
        if (l->n) {
            memcpy(cols + i * K, l->col, (size_t)l->n * sizeof(int32_t));
            memcpy(pre + i * K, l->pre, (size_t)l->n * sizeof(float));
            memcpy(values + i * K, l->val, (size_t)l->n * sizeof(float));
        }
    }
    fs_bf16_free(r);
}

void fs_bf16_collect(fs_bf16_result *r, int64_t *indptr, int32_t *indices, float *values) {
    indptr[0] = 0;
    for (int64_t i = 0; i < r->N; ++i) {
        const fs_list *l = r->rows + i;
        const int64_t o = indptr[i];
        if (l->n) {
            memcpy(indices + o, l->col, (size_t)l->n * sizeof(int32_t));
            memcpy(values + o, l->val, (size_t)l->n * sizeof(float));
        }
        indptr[i + 1] = o + l->n;
    }
    fs_bf16_free(r);
}
