/* bfloat16 encoder kernels of fastsae (issue 13): the bf16 product of
 * (x - b_dec) and W_enc with float32 accumulation, the ReLU / JumpReLU / TopK
 * candidate selection on each output tile while it is in registers or L1,
 * then every selected pre-activation recomputed in float32 from x - b_dec and
 * the feature's float32 encoder column (a contiguous row of W_enc's
 * transpose), so the codes' values are float32 ones.  See bf16_encode.c.
 *
 * Layouts (all C order):
 *   W      float32 [d_in, d_sae]  (SAELens's W_enc)
 *   Wp     uint16  [n_panels, K2, 16, 2] bfloat16 (n_panels = 4 * ceil(d_sae / 64),
 *          K2 = ceil(d_in / 2)): panel p holds columns 16p..16p+15; element
 *          (q, c, e) is W[2q + e, 16p + c], zero outside W.  This is the
 *          operand layout of vdpbf16ps (pairs of k in each 32-bit lane).
 *   WT     float32 [d_sae, d_in]  W's transpose (each feature's column contiguous)
 *   x      float32 [N, d_in], b_dec float32 [d_in], b_enc float32 [d_sae]
 *   thr    float32 [d_sae] or NULL (NULL: 0); the caller passes max(theta, 0)
 *   cut_base, cut_scale  float32 [d_sae] each, or both NULL (threshold mode):
 *          the lowered bf16 cut (numerics.bf16_cut_margin in fastsae)
 * The callers (kernels/cython/bf16.pyx) validate every size before calling.
 */
#ifndef FASTSAE_BF16_ENCODE_H
#define FASTSAE_BF16_ENCODE_H

#include <stdint.h>
#include <string.h>

/* float32 -> bfloat16, round to nearest even; a NaN stays a (quiet) NaN.
 * Inline here so that the Cython weight passes that rewrite the packed copy
 * of W_enc during Adam (kernels/cython/backward.pyx) round as the packer. */
static inline uint16_t fs_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                           /* ties to even */
    return (uint16_t)(u >> 16);
}

#define FS_BF16_EMULATED 0
#define FS_BF16_AVX512BF16 1

/* Columns per output micro-tile (4 panels of 16). */
#define FS_BF16_GROUP_COLS 64

typedef struct fs_bf16_result fs_bf16_result;

/* 1 where this CPU and OS run AVX512-BF16 and this build has the path. */
int fs_bf16_has_avx512bf16(void);
/* 1 where the AVX512-BF16 path was compiled in (the compiler knows it). */
int fs_bf16_built_avx512bf16(void);

/* Number of uint16 elements of Wp for these sizes (inline: the Cython
 * weight pass that rewrites Wp checks its size with it too). */
static inline int64_t fs_bf16_packed_size(int64_t d_in, int64_t d_sae) {
    return (d_sae + FS_BF16_GROUP_COLS - 1) / FS_BF16_GROUP_COLS * (FS_BF16_GROUP_COLS / 16) *
           ((d_in + 1) / 2) * 32;
}

/* W -> (Wp, WT) in one pass. */
void fs_bf16_pack(const float *W, int64_t d_in, int64_t d_sae, uint16_t *Wp, float *WT,
                  int nthreads);

/* Encode.  k == 0: threshold mode (ReLU, JumpReLU): (i, j) is kept where the
 * bf16 pre-activation and the float32 one are both > thr[j]; with cut_base
 * and cut_scale, where the bf16 one is > cut_base[j] - r_i * cut_scale[j]
 * (r_i = |x_i - b_dec|_2 rounded up, the cut in float32 with one rounding)
 * and the float32 one > thr[j] (an exact selection of pre > thr where the
 * margin bounds the bf16 error).  k >= 1: TopK (cut_* ignored):
 * per row the m largest bf16 pre-activations (ties: lower index) are the
 * candidates, then the k largest float32 ones among them (ties: lower index),
 * then those > 0.  Returns NULL when memory runs out; *nnz gets the entry count. */
fs_bf16_result *fs_bf16_encode(int path, const float *x, const float *b_dec, int64_t N,
                               int64_t d_in, int64_t d_sae, const uint16_t *Wp,
                               const float *WT, const float *b_enc, const float *thr,
                               const float *cut_base, const float *cut_scale, int64_t k,
                               int64_t m, int nthreads, int64_t *nnz);

/* BatchTopK candidates: per row the K best positive bf16 pre-activations
 * (1 <= K <= d_sae; ties: lower index), sorted by (bf16 value desc, column
 * asc), each with its float32 pre-activation, and the row's count of positive
 * bf16 pre-activations (more than K: the buffer was truncated).  *nnz gets
 * the candidate count.  Collect with fs_bf16_collect_candidates. */
fs_bf16_result *fs_bf16_encode_candidates(int path, const float *x, const float *b_dec,
                                          int64_t N, int64_t d_in, int64_t d_sae,
                                          const uint16_t *Wp, const float *WT,
                                          const float *b_enc, int64_t K, int nthreads,
                                          int64_t *nnz);
/* Write candidates as [N, K] arrays (row i's first counts[i] entries; the rest
 * untouched): cols, pre (bf16 values), values (float32); npos [N]; free r. */
void fs_bf16_collect_candidates(fs_bf16_result *r, int64_t K, int64_t *counts, int64_t *npos,
                                int32_t *cols, float *pre, float *values);

/* Write the result as CSR (indptr [N + 1], sorted indices, values) and free it. */
void fs_bf16_collect(fs_bf16_result *r, int64_t *indptr, int32_t *indices, float *values);
void fs_bf16_free(fs_bf16_result *r);

#endif
