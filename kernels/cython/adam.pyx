"""Fused Adam update of all four SAE parameters (``fastsae.backends.cython._adam``).

One parallel pass: the parameters are cut into tasks (chunks of the flat
encoder weights and biases, blocks of whole decoder rows) that OpenMP
threads share; each element's moments, bias-corrected step and parameter
update are done in one visit. In ``unit_norm`` mode each decoder row is
rescaled to unit norm right after its update, while it is in cache.

Element arithmetic is float32 in the reference's order, so results match
PyTorch/NumPy Adam to rounding. The training steps do not call this: they
fuse Adam into the backward's feature pass (``_backward.train_backward``);
this is the stand-alone update of all four parameters from given gradients.
:func:`adam_flat` is the same update of one flat array: the skip
transcoder's ``W_skip``, which the training steps update after their kernel
(its gradient ``D.T @ x`` needs the kernel's ``D``).
Nothing validates its arguments before it, so it checks their shapes.
"""

cimport cython
from cython.parallel cimport prange
from libc.math cimport sqrt

from common cimport AdamConsts, _adam, _adam_consts, _dot_d

cdef enum:
    _CHUNK = 16384   # elements per task of the flat arrays


def adam_step(float[:, ::1] W_enc, float[::1] b_enc, float[:, ::1] W_dec, float[::1] b_dec,
              const float[:, ::1] gW_enc, const float[::1] gb_enc,
              const float[:, ::1] gW_dec, const float[::1] gb_dec,
              float[:, ::1] mW_enc, float[::1] mb_enc, float[:, ::1] mW_dec, float[::1] mb_dec,
              float[:, ::1] vW_enc, float[::1] vb_enc, float[:, ::1] vW_dec, float[::1] vb_dec,
              const float[::1] adam_consts, bint renormalize, int nthreads):
    """In-place Adam step. ``adam_consts``: float32 ``[8]`` from
    ``fastsae.backends.numerics.adam_constants`` (``beta1, beta2, 1 - beta1,
    1 - beta2, lr, eps, 1 - beta1**t, 1 - beta2**t``). ``renormalize``:
    rescale every nonzero decoder row to unit L2 norm after its update
    (``unit_norm`` mode). Returns how many updated parameters are inf or
    NaN."""
    cdef Py_ssize_t d_in = W_enc.shape[0], d_sae = W_enc.shape[1]
    if (gW_enc.shape[0] != d_in or mW_enc.shape[0] != d_in or vW_enc.shape[0] != d_in
            or gW_enc.shape[1] != d_sae or mW_enc.shape[1] != d_sae or vW_enc.shape[1] != d_sae
            or W_dec.shape[0] != d_sae or gW_dec.shape[0] != d_sae or mW_dec.shape[0] != d_sae
            or vW_dec.shape[0] != d_sae or W_dec.shape[1] != d_in or gW_dec.shape[1] != d_in
            or mW_dec.shape[1] != d_in or vW_dec.shape[1] != d_in
            or b_enc.shape[0] != d_sae or gb_enc.shape[0] != d_sae or mb_enc.shape[0] != d_sae
            or vb_enc.shape[0] != d_sae or b_dec.shape[0] != d_in or gb_dec.shape[0] != d_in
            or mb_dec.shape[0] != d_in or vb_dec.shape[0] != d_in):
        raise ValueError("adam_step: shape mismatch")
    if adam_consts.shape[0] != 8:
        raise ValueError("adam_step: adam_consts must hold the 8 numerics.adam_constants")

    cdef Py_ssize_t n_enc = d_in * d_sae
    cdef Py_ssize_t t_enc = (n_enc + _CHUNK - 1) // _CHUNK
    cdef Py_ssize_t rows_per = max(1, _CHUNK // d_in)
    cdef Py_ssize_t t_dec = (d_sae + rows_per - 1) // rows_per
    cdef Py_ssize_t t_be = (d_sae + _CHUNK - 1) // _CHUNK
    cdef Py_ssize_t t_bd = (d_in + _CHUNK - 1) // _CHUNK
    cdef Py_ssize_t ntasks = t_enc + t_dec + t_be + t_bd, task, s, cnt, r, r1, k
    cdef Py_ssize_t bad = 0
    cdef float nrm
    cdef float* w
    cdef AdamConsts c = _adam_consts(&adam_consts[0])
    for task in prange(ntasks, nogil=True, num_threads=nthreads, schedule="dynamic"):
        if task < t_enc:
            s = task * _CHUNK
            cnt = min(<Py_ssize_t>_CHUNK, n_enc - s)
            bad += _adam(&W_enc[0, 0] + s, &gW_enc[0, 0] + s, &mW_enc[0, 0] + s,
                         &vW_enc[0, 0] + s, cnt, &c)
        elif task < t_enc + t_dec:
            s = (task - t_enc) * rows_per
            r1 = min(s + rows_per, d_sae)
            for r in range(s, r1):
                w = &W_dec[r, 0]
                bad += _adam(w, &gW_dec[r, 0], &mW_dec[r, 0], &vW_dec[r, 0],
                             d_in, &c)
                if renormalize:
                    nrm = <float>sqrt(_dot_d(w, w, d_in))
                    if nrm > 0:
                        for k in range(d_in):
                            w[k] = w[k] / nrm
        elif task < t_enc + t_dec + t_be:
            s = (task - t_enc - t_dec) * _CHUNK
            cnt = min(<Py_ssize_t>_CHUNK, d_sae - s)
            bad += _adam(&b_enc[0] + s, &gb_enc[0] + s, &mb_enc[0] + s, &vb_enc[0] + s,
                         cnt, &c)
        else:
            s = (task - t_enc - t_dec - t_be) * _CHUNK
            cnt = min(<Py_ssize_t>_CHUNK, d_in - s)
            bad += _adam(&b_dec[0] + s, &gb_dec[0] + s, &mb_dec[0] + s, &vb_dec[0] + s,
                         cnt, &c)
    return bad


def adam_flat(float[::1] p, const float[::1] g, float[::1] m, float[::1] v,
              const float[::1] adam_consts, int nthreads):
    """In-place Adam step of one flat float32 array (a C-contiguous
    parameter seen through ``ravel``: the skip transcoder's ``W_skip``), in
    chunks of ``_CHUNK`` elements in parallel, with the constants and
    arithmetic of :func:`adam_step`. Returns how many updated parameters
    are inf or NaN."""
    cdef Py_ssize_t n = p.shape[0]
    if g.shape[0] != n or m.shape[0] != n or v.shape[0] != n:
        raise ValueError("adam_flat: shape mismatch")
    if adam_consts.shape[0] != 8:
        raise ValueError("adam_flat: adam_consts must hold the 8 numerics.adam_constants")
    cdef AdamConsts c = _adam_consts(&adam_consts[0])
    cdef Py_ssize_t ntasks = (n + _CHUNK - 1) // _CHUNK, task, s, cnt
    cdef Py_ssize_t bad = 0
    for task in prange(ntasks, nogil=True, num_threads=nthreads, schedule="static"):
        s = task * _CHUNK
        cnt = min(<Py_ssize_t>_CHUNK, n - s)
        bad += _adam(&p[0] + s, &g[0] + s, &m[0] + s, &v[0] + s, cnt, &c)
    return bad
