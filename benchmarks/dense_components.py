"""One-thread CPU time of the Numba dense ReLU path's parts at paper size, in
units of one encoder GEMM (its floor: the encoder 1, the row pass 2, the
weight pass 2), for the block sizes the tunables choose between::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/dense_components.py

CPU time of one thread, so a busy machine disturbs it less than wall time.
"""
import time, statistics, numpy as np, numba
numba.set_num_threads(1)
from fastsae.backends.numba import encode as E, dense as DN, norms as NR, _blas_single
from fastsae.backends import numerics as NU
n, d_in, d_sae = 4096, 512, 8192
rng = np.random.default_rng(0)
W_enc = (rng.normal(size=(d_in, d_sae)) / np.sqrt(d_in)).astype(np.float32)
W_dec = np.ascontiguousarray(W_enc.T); W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
x = rng.normal(size=(n, d_in)).astype(np.float32)
b_enc = np.zeros(d_sae, np.float32); b_dec = np.zeros(d_in, np.float32)
def T(fn, r=3):
    fn(); ts = []
    for _ in range(r):
        t = time.process_time(); fn(); ts.append(time.process_time() - t)
    return statistics.median(ts)
with _blas_single():
    xc = E.centered(x, b_dec)
    f = E.encode_relu_dense(xc, W_enc, b_enc, 256, 1)
    out = np.empty_like(f)
    mm = T(lambda: E.gemm(xc, W_enc, out, 1.0, 0.0, False, False))
    norms = NR.row_norms(W_dec); c = np.float32(1e-4 / n)
    enc256 = T(lambda: E.encode_relu_dense(xc, W_enc, b_enc, 256, 1))
    enc1024 = T(lambda: E.encode_relu_dense(xc, W_enc, b_enc, 1024, 1))
    rp256 = T(lambda: DN._row_pass(f, x, np.empty((0, 0), np.float32), W_dec, b_dec, norms, c, 256, 1))
    rp1024 = T(lambda: DN._row_pass(f, x, np.empty((0, 0), np.float32), W_dec, b_dec, norms, c, 1024, 1))
    d_xhat, d_pre, row_sq, pd, pf, pc = DN._row_pass(f, x, np.empty((0, 0), np.float32), W_dec, b_dec, norms, c, 256, 1)
    g_b_enc, csum, cnt = DN._column_totals(pd, pf, pc)
    mom = [np.zeros_like(a) for a in (W_enc, W_enc, b_enc, b_enc, W_dec, W_dec)]
    adam_c = NU.adam_constants(1e-7, 0.9, 0.999, 1e-8, 1)
    We2 = W_enc.copy(); be2 = b_enc.copy(); Wd2 = W_dec.copy()
    res = {}
    for fb in (256, 512, 1024):
        res[fb] = T(lambda: DN._feature_adam(f, d_pre, d_xhat, xc, Wd2, norms, c, False, csum, g_b_enc, We2, be2, *mom, adam_c, fb))
print(f"one thread, CPU s: gemm {mm:.3f}; dense encode rb256 {enc256/mm:.2f}x rb1024 {enc1024/mm:.2f}x; row pass rb256 {rp256/mm:.2f}x rb1024 {rp1024/mm:.2f}x; feature_adam " + " ".join(f"fb{k} {v/mm:.2f}x" for k, v in res.items()))
