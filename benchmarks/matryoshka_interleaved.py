"""Matryoshka BatchTopK against BatchTopK, interleaved in one process (each
round times the bare encoder matmul, then for each backend a BatchTopK step
and a Matryoshka step), so load drift on a shared machine hits all alike.
Paper size (N=4096, d_in=512, d_sae=8192), k = 32, widths [1024, 2048, 4096,
8192]; medians over rounds after the first (compilation).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/matryoshka_interleaved.py numba,cython 8
"""
import time, sys, numpy as np, fastsae
from fastsae import SAEParams, AdamState


def main():
    rng=np.random.default_rng(0)
    N,d,S,k=4096,512,8192,32
    widths=[1024,2048,4096,8192]
    x=rng.standard_normal((N,d)).astype(np.float32)
    W=rng.standard_normal((S,d)).astype(np.float32); W/=np.linalg.norm(W,axis=1,keepdims=True)
    p0=SAEParams(np.ascontiguousarray(W.T*0.1),np.zeros(S,np.float32),W.copy(),np.zeros(d,np.float32))
    res={}
    bes={n:fastsae.get_backend(n) for n in sys.argv[1].split(",")}
    state={n:(p0.copy(),AdamState.zeros_like(p0)) for n in bes}
    for r in range(int(sys.argv[2])):
        t=time.perf_counter(); x@p0.W_enc; res.setdefault("matmul",[]).append(time.perf_counter()-t)
        for n,be in bes.items():
            p,st=state[n]
            t=time.perf_counter(); be.train_step_topk(p,st,x,k=k,activation="batchtopk",lr=1e-4); res.setdefault(n+"_btk",[]).append(time.perf_counter()-t)
            t=time.perf_counter(); be.train_step_matryoshka(p,st,x,k=k,widths=widths,lr=1e-4); res.setdefault(n+"_mat",[]).append(time.perf_counter()-t)
    m={k_:np.median(v[1:]) for k_,v in res.items()}
    for k_,v in m.items(): print(f"{k_:12s} {v*1e3:8.1f} ms  {v/m['matmul']:.2f}x matmul")
    for n in bes: print(n, "mat/btk", round(m[n+"_mat"]/m[n+"_btk"],3))
    if "numba" in bes and "cython" in bes: print("cython/numba mat", round(m["cython_mat"]/m["numba_mat"],3))


if __name__ == "__main__":
    main()
