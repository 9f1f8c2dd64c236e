"""Feature-sharded training: every rank owns a contiguous slice of the latents.

Rank ``r`` of ``R`` owns latents ``[r d_sae / R, (r + 1) d_sae / R)``: its
columns of ``W_enc``, its entries of ``b_enc``, its rows of ``W_dec``, their
Adam moments and firing counters; ``b_dec`` (and a skip transcoder's
``W_skip``) is replicated. No rank allocates the whole dictionary or its
Adam state: :class:`FeatureShardedSAE` describes the model, and each rank
draws only its slice of the initial parameters (:func:`sharded_init`, bit for
bit the slice of ``SparseAutoencoder(d_in, d_sae, seed=...)``'s, drawn from
the same random stream in row chunks without keeping the rest).

Every rank sees the whole batch. One step (:class:`FeatureSharded`):

1. each rank encodes the batch with its latents (ReLU; TopK: its ``k``
   largest per row, then one all-gather of ``N x k`` values and indices per
   rank and the same global top ``k`` chosen everywhere, ties to the lower
   latent index; BatchTopK: :func:`~fastsae.distributed.data_parallel.
   global_batchtopk` over the batch);
2. it decodes its partial reconstruction; one fixed-order all-reduce of the
   ``N x d_out`` partials gives every rank the same ``x_hat``;
3. each rank computes its own latents' gradients with the backend's
   ``gradients`` / ``topk_gradients`` kernels from that ``x_hat``; AuxK
   selects the ``k_aux`` largest dead pre-activations per row the same way
   as TopK, and its reconstruction is all-reduced like ``x_hat``. JumpReLU:
   one fused encode at each latent's window edge ``theta - bandwidth / 2``
   gives the active entries (``pre > theta``, decoded as above) and the
   rectangle kernel's window; the reconstruction gradients are ReLU's at
   the active entries (no L1 term), and the thresholds' pseudo-gradient
   and the sparsity terms ("step", "tanh", "quadratic") are added from the
   window's ``d_xhat . W_dec[j]`` dots; "quadratic" needs each row's global
   L0 (an all-gather of ``N`` counts);
4. the replicated ``b_dec`` gradient (``sum_i d_xhat_i - sum_r W_enc_r
   g_b_enc_r``) and the step's loss sums travel in one small float64
   all-gather, added in rank order; every rank runs Adam on its slice and the
   same update of ``b_dec``.

Checkpoints are one file per rank plus an index (:func:`write_shards`,
:func:`read_shards`), readable on any rank count and in one process
(:func:`load_sharded_sae` assembles the trained SAE).

Trained here: ``relu`` (both decoder norms), ``topk`` and ``batchtopk``
(with AuxK), ``jumprelu`` (its three sparsity modes), SAEs and transcoders.
Not yet: ``matryoshka_batchtopk`` (each prefix's reconstruction would need
its own all-reduce), JumpReLU's pre-activation loss, resampling, the CUDA
backend.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from numba import njit, prange

from ..backends import get_backend, numerics
from ..backends.numba.adam import adam_flat
from ..backends.reference import _project_out_parallel, normalize_decoder_rows
from ..io import SAEFormatError
from ..model import SparseAutoencoder
from ..params import SAEParams
from ..sparse import SparseCodes
from ..training.checkpoint import CHECKPOINT_FILENAME, read_checkpoint, write_checkpoint
from .data_parallel import global_batchtopk, rank_rows

__all__ = ["FeatureShardedSAE", "FeatureSharded", "sharded_init", "feature_bounds",
           "read_shards", "write_shards", "slice_tensors", "load_sharded_sae", "FEATURE_ACTIVATIONS"]

#: Activations feature-sharded training trains.
FEATURE_ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")


#: Above one window entry in this many of a rank's ``N x n_local``
#: pre-activations, the threshold gradient's dots come from one BLAS product
#: ``d_xhat @ W_dec.T`` (then gathered) instead of one dot per entry. Measured
#: on AMD EPYC, OpenBLAS SkylakeX, one thread, random entries: at 1/64 of the
#: entries the dots took 0.35x (N 1024, d 128, 2048 latents) and 0.64x
#: (N 4096, d 512, 8192 latents) of the product and gather, at 1/16 1.3x and 3.0x.
_WINDOW_DENSE_RATIO = 32

@njit(parallel=True, cache=True)
def _window_dots(d_xhat, W_dec, rows, cols, out):
    """``out[e] = d_xhat[rows[e]] . W_dec[cols[e]]`` for every window entry
    (float32 ``[N, d_out]``, ``[n_local, d_out]``, int64 index arrays): one
    dot per entry, read in place (no gathered copies)."""
    d = d_xhat.shape[1]
    for e in prange(rows.size):
        a = d_xhat[rows[e]]
        b = W_dec[cols[e]]
        acc = np.float32(0.0)
        for i in range(d):
            acc += a[i] * b[i]
        out[e] = acc

#: Rows of the random stream drawn at once by :func:`sharded_init`.
_INIT_CHUNK_ROWS = 4096

#: Directory (under the run directory) of the per-rank checkpoint files.
SHARDS_DIR = "checkpoint.shards"

#: Tensors split over the latents, and the axis they are split along; the
#: others (b_dec, W_skip, their moments, topk.threshold) are replicated.
_SPLIT_AXIS = {f"{pre}.{n}": ax for pre in ("param", "adam_m", "adam_v")
               for n, ax in (("W_enc", 1), ("b_enc", 0), ("W_dec", 0))}
_SPLIT_AXIS.update({"fire.cur": 0, "fire.prev": 0, "topk.since": 0,
                    "jumprelu.log_threshold": 0, "jumprelu.threshold_m": 0,
                    "jumprelu.threshold_v": 0, "jumprelu.since": 0})


def feature_bounds(d_sae: int, size: int) -> list[tuple[int, int]]:
    """``[(lo, hi)]`` of each rank's latents (contiguous, near-equal)."""
    return [rank_rows(d_sae, r, size) for r in range(size)]


class FeatureShardedSAE:
    """The description of a :class:`fastsae.SparseAutoencoder` to train
    feature-sharded (``Trainer(FeatureShardedSAE(...), data, cfg,
    distributed="features")``): the constructor's arguments, no parameters.
    Each rank builds its slice with :meth:`local_model`."""

    fresh = True
    widths = None
    threshold = None

    def __init__(self, d_in: int, d_sae: int, *, decoder_norm: str | None = None,
                 backend=None, seed: int = 0, init_norm: float = 0.1,
                 activation: str = "relu", k: int | None = None, transcoder: bool = False,
                 d_out: int | None = None, skip: bool = False):
        if activation not in FEATURE_ACTIVATIONS:
            raise ValueError(f"feature-sharded training trains activations "
                             f"{', '.join(FEATURE_ACTIVATIONS)}; {activation!r} is not "
                             "supported yet (use distributed='data')")
        # the model's own checks, on a model of one latent (or k): no large arrays
        probe = SparseAutoencoder(d_in, max(1, k or 1), decoder_norm=decoder_norm,
                                  backend=backend, seed=seed, init_norm=init_norm,
                                  activation=activation, k=k, transcoder=transcoder,
                                  d_out=d_out, skip=skip)
        if k is not None and k > d_sae:
            raise ValueError(f"k must be at most d_sae={d_sae}, got {k}")
        self.d_in, self.d_sae, self.d_out = probe.d_in, int(d_sae), probe.d_out
        self.decoder_norm, self.seed, self.init_norm = probe.decoder_norm, int(seed), init_norm
        self.activation, self.k = activation, k
        self.transcoder, self.skip = bool(transcoder), bool(skip)
        self.architecture = probe.architecture
        self._backend_arg = backend

    @property
    def backend(self):
        return get_backend(self._backend_arg)

    def local_model(self, lo: int, hi: int, backend=None) -> SparseAutoencoder:
        """The SAE of latents ``lo:hi`` with their initial parameters."""
        n = hi - lo
        m = SparseAutoencoder(self.d_in, n, decoder_norm=self.decoder_norm,
                              backend=backend if backend is not None else self._backend_arg,
                              seed=self.seed, init_norm=self.init_norm,
                              activation=self.activation,
                              k=None if self.k is None else min(self.k, n),
                              transcoder=self.transcoder,
                              d_out=self.d_out if self.transcoder else None, skip=self.skip)
        m.params = sharded_init(self, lo, hi)  # still fresh: b_dec is set from data
        return m

    def model_info(self) -> dict:
        """What rebuilds the whole model (:func:`fastsae.training.state.model_from_info`)."""
        return {"type": "SparseAutoencoder", "d_in": self.d_in, "d_sae": self.d_sae,
                "decoder_norm": self.decoder_norm, "seed": self.seed,
                "activation": self.activation, "k": self.k, "widths": None,
                "transcoder": self.transcoder, "d_out": self.d_out, "skip": self.skip}

    @classmethod
    def from_info(cls, info: dict, backend=None) -> "FeatureShardedSAE":
        return cls(info["d_in"], info["d_sae"], decoder_norm=info["decoder_norm"],
                   backend=backend, seed=info["seed"], activation=info["activation"],
                   k=info["k"], transcoder=bool(info.get("transcoder")),
                   d_out=info.get("d_out") if info.get("transcoder") else None,
                   skip=bool(info.get("skip")))


def _rows_of_stream(rng, n_rows: int, width: int, lo: int, hi: int):
    """Rows ``lo:hi`` of ``rng.standard_normal((n_rows, width))``, drawing the
    stream in chunks and keeping only those rows; the stream ends where the
    full draw would leave it."""
    out = np.empty((hi - lo, width))
    for a in range(0, n_rows, _INIT_CHUNK_ROWS):
        b = min(n_rows, a + _INIT_CHUNK_ROWS)
        chunk = rng.standard_normal((b - a, width))
        s, e = max(a, lo), min(b, hi)
        if s < e:
            out[s - lo:e - lo] = chunk[s - a:e - a]
    return out


def sharded_init(spec: FeatureShardedSAE, lo: int, hi: int) -> SAEParams:
    """Latents ``lo:hi`` of the initial parameters of the model ``spec``
    describes, equal to the same slice of ``SparseAutoencoder``'s own."""
    rng = np.random.default_rng(spec.seed)
    w = _rows_of_stream(rng, spec.d_sae, spec.d_out, lo, hi)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    dec_norm = 1.0 if spec.decoder_norm == "unit_norm" else spec.init_norm
    W_dec = (w * dec_norm).astype(np.float32)
    if spec.transcoder:
        w = _rows_of_stream(rng, spec.d_sae, spec.d_in, lo, hi)
        w /= np.linalg.norm(w, axis=1, keepdims=True)
    W_enc = np.ascontiguousarray((w * spec.init_norm).T, dtype=np.float32)
    return SAEParams(W_enc, np.zeros(hi - lo, np.float32), W_dec,
                     np.zeros(spec.d_out, np.float32),
                     np.zeros((spec.d_out, spec.d_in), np.float32) if spec.skip else None)


# ================================================================ the step
class FeatureSharded:
    """The feature-sharded step of a rank's :class:`~fastsae.training.state.
    TrainingState` (of its latents ``lo:hi``); see the module docstring."""

    def __init__(self, comm, state, spec: FeatureShardedSAE, lo: int, hi: int):
        if getattr(state.backend, "DEVICE_ARRAYS", False):
            raise ValueError(f"feature-sharded training runs on the CPU backends; backend "
                             f"{state.backend.name!r} computes on a device")
        self.comm, self.state, self.spec = comm, state, spec
        self.lo, self.hi = int(lo), int(hi)
        self.bounds = feature_bounds(spec.d_sae, comm.size)
        cfg = state.config
        self.k = spec.k
        self.k_aux = cfg.resolved_k_aux(spec.d_in, spec.d_sae) \
            if spec.activation in ("topk", "batchtopk") else 0
        if spec.activation == "jumprelu" and state.pre_act:
            raise ValueError("the JumpReLU pre-activation loss (pre_act_loss_coefficient) is "
                             "not implemented for feature-sharded training (use "
                             "distributed='data')")

    # ------------------------------------------------------------ selection
    def _row_topk(self, be, x, W, b, c, k: int, cols: np.ndarray | None = None):
        """Per row the ``k`` largest pre-activations over every rank's
        latents (ties: lower global index), ReLU; this rank's part as
        SparseCodes over its ``hi - lo`` latents. ``cols``: only these local
        latents compete (AuxK's dead ones), ``W``/``b`` already restricted."""
        n = x.shape[0]
        own = W.shape[1]
        kk = min(k, own)
        if kk:
            cand = be.encode_topk(x, W, b, c, kk).to_host()
            ind = np.asarray(cand.indices, np.int64)
            ind = ind if cols is None else cols[ind]
            indptr = np.asarray(cand.indptr)
            vals_l = np.asarray(cand.values)
        else:
            ind = np.zeros(0, np.int64)
            indptr = np.zeros(n + 1, np.int64)
            vals_l = np.zeros(0, np.float32)
        vals = np.full((n, k), -np.inf, np.float32)
        idx = np.full((n, k), np.iinfo(np.int64).max, np.int64)
        cnt = np.diff(indptr)
        row = np.repeat(np.arange(n), cnt)
        pos = np.arange(ind.size) - np.repeat(indptr[:-1], cnt)
        vals[row, pos] = vals_l
        idx[row, pos] = ind + self.lo
        V = self.comm.allgather_rows(vals.ravel()).reshape(self.comm.size, n, k)
        Ix = self.comm.allgather_rows(idx.ravel()).reshape(self.comm.size, n, k)
        V = V.transpose(1, 0, 2).reshape(n, -1)  # rank order: increasing global index
        Ix = Ix.transpose(1, 0, 2).reshape(n, -1)
        order = np.argsort(-V, axis=1, kind="stable")[:, :k]
        wv = np.take_along_axis(V, order, axis=1)
        wi = np.take_along_axis(Ix, order, axis=1)
        mine = (wv > 0) & (wi >= self.lo) & (wi < self.hi)
        wi = np.where(mine, wi, np.iinfo(np.int64).max)
        srt = np.argsort(wi, axis=1, kind="stable")
        wi = np.take_along_axis(wi, srt, axis=1)
        wv = np.take_along_axis(wv, srt, axis=1)
        keep = wi != np.iinfo(np.int64).max
        counts = keep.sum(axis=1)
        out_ptr = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=out_ptr[1:])
        return SparseCodes(out_ptr, (wi[keep] - self.lo).astype(np.int32),
                           np.ascontiguousarray(wv[keep], np.float32),
                           (n, self.hi - self.lo))

    def _codes(self, be, x, p, c):
        act = self.spec.activation
        if act == "relu":
            return be.encode_relu_sparse(x, p.W_enc, p.b_enc, c)
        if act == "topk":
            return self._row_topk(be, x, p.W_enc, p.b_enc, c, self.k)
        if act == "jumprelu":
            theta = numerics.jumprelu_window(np.asarray(self.state.log_threshold),
                                             self.state.config.jumprelu_bandwidth)[0]
            return be.encode_jumprelu(x, p.W_enc, p.b_enc, c, theta)
        return global_batchtopk(self.comm, be, x, p.W_enc, p.b_enc, c, self.k, x.shape[0],
                                col_offset=self.lo, d_total=self.spec.d_sae)

    def _decode_sum(self, be, codes, W_dec) -> np.ndarray:
        """``sum over ranks of codes_r @ W_dec_r`` (float32 ``[N, d_out]``, the
        same bytes on every rank)."""
        z = np.zeros(W_dec.shape[1], np.float32)
        part = np.ascontiguousarray(be.decode(codes, W_dec, z), dtype=np.float32)
        self.comm.allreduce_sum(part.reshape(-1))
        return part

    def _x_hat(self, be, codes, p, x):
        x_hat = self._decode_sum(be, codes, p.W_dec) + np.asarray(p.b_dec)
        if p.W_skip is not None:
            x_hat = x_hat + x @ np.asarray(p.W_skip).T
        return np.ascontiguousarray(x_hat, dtype=np.float32)

    # ------------------------------------------------------------ AuxK
    def _auxk(self, be, st, x, t, x_hat, p, c):
        """AuxK on the sharded latents: ``(aux loss, W_dec, W_enc, b_enc
        gradient additions)`` or ``None`` when off (the same terms as
        :func:`fastsae.backends.reference._auxk_terms`, computed here because
        the residual's fit needs every rank's part)."""
        cfg = st.config
        dead_local = st.since >= st.dead_tokens
        n_dead = int(self.comm.allgather_rows(
            np.array([np.count_nonzero(dead_local)], np.int64)).sum())
        if not (self.k_aux > 0 and cfg.aux_coefficient > 0 and n_dead > 0):
            return None
        weight = float(cfg.aux_coefficient) * min(n_dead / self.k_aux, 1.0)
        dead = np.flatnonzero(dead_local)
        W = np.ascontiguousarray(np.asarray(p.W_enc)[:, dead])
        b = np.ascontiguousarray(np.asarray(p.b_enc)[dead])
        fa = self._row_topk(be, x, W, b, c, min(self.k_aux, n_dead), cols=dead)
        e_hat = self._decode_sum(be, fa, p.W_dec)
        n = x.shape[0]
        err = e_hat - (t - x_hat)
        d_ehat = (weight * 2.0 / n) * err
        loss = float(weight * np.sum(err.astype(np.float64) ** 2) / n)
        import scipy.sparse as sp
        F = sp.csr_array((fa.values, fa.indices, fa.indptr), shape=fa.shape)
        g_W_dec = np.asarray(F.T @ d_ehat, np.float32)
        g_W_dec = _project_out_parallel(g_W_dec, np.asarray(p.W_dec)).astype(np.float32)
        used, where = np.unique(np.asarray(fa.indices), return_inverse=True)
        dots = d_ehat @ np.asarray(p.W_dec)[used].T  # [N, n_used]
        row = np.repeat(np.arange(n), np.diff(np.asarray(fa.indptr)))
        dp = dots[row, where].astype(np.float32)
        Dp = sp.csr_array((dp, fa.indices, fa.indptr), shape=fa.shape)
        xc = x - np.asarray(c)
        g_W_enc = np.asarray((Dp.T @ xc).T, np.float32)
        g_b_enc = np.asarray(Dp.sum(axis=0), np.float32).ravel()
        return loss, g_W_dec, g_W_enc, g_b_enc

    # ------------------------------------------------------------ JumpReLU
    def _jumprelu_candidates(self, be, x, p, c):
        """``(active codes, window entries)`` of this rank's latents: the codes
        ``pre > theta`` (SparseCodes, values ``pre``) and the rectangle
        kernel's window ``theta - bw/2 < pre < theta + bw/2`` as host
        ``(rows, cols, pre)`` arrays (cols local), from one fused encode at
        the window's lower edge (and, where that edge is at or below 0, one
        more over those latents for the entries ReLU drops)."""
        st = self.state
        theta, lo, hi = numerics.jumprelu_window(np.asarray(st.log_threshold),
                                                 st.config.jumprelu_bandwidth)
        n = x.shape[0]
        cand = be.encode_jumprelu(x, p.W_enc, p.b_enc, c, np.maximum(lo, 0)).to_host()
        ptr = np.asarray(cand.indptr, np.int64)
        cols = np.asarray(cand.indices, np.int64)
        pre = np.asarray(cand.values, np.float32)
        rows = np.repeat(np.arange(n), np.diff(ptr))
        act = pre > theta[cols]
        counts = np.bincount(rows[act], minlength=n)
        a_ptr = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=a_ptr[1:])
        active = SparseCodes(a_ptr, cols[act].astype(np.int32),
                             np.ascontiguousarray(pre[act]), (n, self.hi - self.lo))
        win = (pre > lo[cols]) & (pre < hi[cols])
        w_rows, w_cols, w_pre = rows[win], cols[win], pre[win]
        low = np.flatnonzero(lo < 0)
        if low.size:  # window entries lo < pre <= 0: shift by -lo, then select pre <= 0
            W = np.ascontiguousarray(np.asarray(p.W_enc)[:, low])
            b = np.ascontiguousarray(np.asarray(p.b_enc)[low] - lo[low])
            e = be.encode_jumprelu(x, W, b, c, np.zeros(low.size, np.float32)).to_host()
            e_cols = low[np.asarray(e.indices, np.int64)]
            e_rows = np.repeat(np.arange(n), np.diff(np.asarray(e.indptr, np.int64)))
            e_pre = np.asarray(e.values, np.float32) + lo[e_cols]
            # pre <= 0 as the first encode decided it (an entry it kept is not
            # taken twice, whatever the shifted sum rounds to)
            own = self.hi - self.lo
            keep = ~np.isin(e_rows * own + e_cols, rows * own + cols)
            w_rows = np.concatenate([w_rows, e_rows[keep]])
            w_cols = np.concatenate([w_cols, e_cols[keep]])
            w_pre = np.concatenate([w_pre, e_pre[keep]])
        return active, (w_rows, w_cols, w_pre)

    def _jumprelu_terms(self, x, t, x_hat, p, c, active, window, coefficient):
        """The JumpReLU terms the reconstruction gradients lack (see
        :func:`fastsae.backends.reference.jumprelu_gradients`): ``(g_log_threshold,
        this rank's share of the sparsity loss, extra W_enc and b_enc gradients or
        None)``. The threshold's pseudo-gradient takes ``d_xhat . W_dec[j]``
        at this rank's window entries; "quadratic" needs every row's global
        L0 (one all-gather of ``N`` counts)."""
        st = self.state
        sp_ = st.sparsity
        bw = float(st.config.jumprelu_bandwidth)
        cf = float(coefficient)
        n = x.shape[0]
        own = self.hi - self.lo
        theta = numerics.jumprelu_window(np.asarray(st.log_threshold), bw)[0]
        d_xhat = ((2.0 / n) * (x_hat - t)).astype(np.float32)
        W_dec = np.asarray(p.W_dec)
        w_rows, w_cols, w_pre = window
        if w_rows.size * _WINDOW_DENSE_RATIO > n * own:
            # a wide window (a fresh SAE): one BLAS product beats a dot per entry
            df = (d_xhat @ W_dec.T)[w_rows, w_cols].astype(np.float32)
        else:
            df = np.empty(w_rows.size, np.float32)
            _window_dots(d_xhat, np.ascontiguousarray(W_dec, np.float32), w_rows, w_cols, df)
        extra = None
        if sp_.mode == "tanh":
            s = float(sp_.tanh_scale)
            w_f = np.where(w_pre > theta[w_cols], w_pre, 0).astype(np.float32)
            th_w = np.tanh(np.float32(s) * w_f)
            df = df + np.float32(cf * s / n) * (1 - th_w * th_w)
            th = np.tanh(np.float32(s) * np.asarray(active.values))
            share = cf * float(th.astype(np.float64).sum()) / n
            import scipy.sparse as sps
            E = sps.csr_array((np.float32(cf * s / n) * (1 - th * th), active.indices,
                               active.indptr), shape=active.shape)
            xc = x - np.asarray(c)
            extra = (np.asarray((E.T @ xc).T, np.float32),
                     np.asarray(E.sum(axis=0), np.float32).ravel())
            step_theta = np.zeros(own)
        elif sp_.mode == "quadratic":
            tl0 = float(sp_.target_l0)
            mine = np.diff(np.asarray(active.indptr, np.int64))
            cnt = self.comm.allgather_rows(mine).reshape(self.comm.size, n).sum(axis=0)
            err = cnt.astype(np.float64) - tl0
            q = (4.0 * cf / (n * tl0)) * err
            step_theta = -(1.0 / bw) * np.bincount(w_cols, weights=q[w_rows], minlength=own)
            # the same global value on every rank: rank 0 alone contributes it
            share = cf * float(np.sum(2.0 / tl0 * err * err)) / n if self.comm.rank == 0 else 0.0
        else:
            step_theta = -(cf / (n * bw)) * np.bincount(w_cols, minlength=own)
            share = cf * float(np.asarray(active.values).size) / n
        g_theta = -(theta.astype(np.float64) / bw) * np.bincount(w_cols, weights=df,
                                                                 minlength=own) + step_theta
        g_lt = (g_theta * theta).astype(np.float32)
        return g_lt, share, extra

    # ------------------------------------------------------------ the step
    def step(self, x, lr: float, coefficient: float, fire_counts) -> dict:
        """One step on the whole host batch ``x`` (every rank the same rows);
        returns the batch's metrics."""
        st = self.state
        be, p, cfg = st.backend, st.params, st.config
        xi, y = st.pair(x)
        t = xi if y is None else y
        n = xi.shape[0]
        c = st.centering()
        jump = self.spec.activation == "jumprelu"
        if jump:
            codes, window = self._jumprelu_candidates(be, xi, p, c)
        else:
            codes = self._codes(be, xi, p, c)
        x_hat = self._x_hat(be, codes, p, xi)
        aux = None
        g_lt, l0_share, jr_extra = None, 0.0, None
        if jump:
            # the reconstruction gradients at the active entries are ReLU's with
            # no L1 term (unit-norm rows, W_dec's gradient projected); the
            # thresholds' and the sparsity terms are added here
            loss, g = be.gradients(xi, p, codes, x_hat, l1_coefficient=0.0,
                                   decoder_norm="unit_norm", y=y)
            g_lt, l0_share, jr_extra = self._jumprelu_terms(xi, t, x_hat, p, c, codes, window,
                                                            coefficient)
        elif self.spec.activation == "relu":
            loss, g = be.gradients(xi, p, codes, x_hat, l1_coefficient=coefficient,
                                   decoder_norm=self.spec.decoder_norm, y=y)
        else:
            loss, g = be.topk_gradients(xi, p, codes, x_hat, None, 0.0, y)
            if st.auxk:
                aux = self._auxk(be, st, xi, t, x_hat, p, c)
        g_W_enc, g_b_enc, g_W_dec = (np.asarray(a) for a in (g.W_enc, g.b_enc, g.W_dec))
        aux_loss = 0.0
        if aux is not None:
            aux_loss, a_dec, a_enc, a_benc = aux
            g_W_dec = g_W_dec + a_dec
            g_W_enc = g_W_enc + a_enc
            g_b_enc = g_b_enc + a_benc
        if jr_extra is not None:
            g_W_enc = g_W_enc + jr_extra[0]
            g_b_enc = g_b_enc + jr_extra[1]
        # the replicated b_dec: D = sum_i d_xhat_i (the same on every rank), and
        # each rank's encoder part -W_enc_r @ g_b_enc_r (an SAE's; none for a transcoder)
        D = (2.0 / n) * np.sum(x_hat.astype(np.float64) - t, axis=0)
        own = np.zeros(self.spec.d_out) if self.spec.transcoder else \
            -(np.asarray(p.W_enc, np.float64) @ g_b_enc.astype(np.float64))
        hc = codes.to_host()
        vals = np.asarray(hc.values)
        head = np.array([loss.l1 * n, float(vals.size),
                         float(vals.min()) if vals.size else np.inf, l0_share], np.float64)
        every = self.comm.allgather_rows(np.concatenate([head, own]))
        s = every.sum(axis=0)
        g_b_dec = (D + s[4:]).astype(np.float32)
        grads = {"W_enc": g_W_enc, "b_enc": g_b_enc, "W_dec": g_W_dec, "b_dec": g_b_dec}
        if p.W_skip is not None:
            grads["W_skip"] = np.asarray(g.W_skip)
        bad = self._adam(st, grads, lr, g_lt)
        if self.spec.decoder_norm == "unit_norm" or jump:
            normalize_decoder_rows(np.asarray(p.W_dec))
        counts = np.bincount(np.asarray(hc.indices), minlength=self.hi - self.lo)
        if getattr(st, "auxk", False):
            fired = counts > 0
            st.since[fired] = 0
            st.since[~fired] += n
        if fire_counts is not None:
            fire_counts += counts
        mse = float(loss.mse)
        l1 = float(s[0] / n)
        var = float(np.sum((t - t.mean(axis=0, dtype=np.float64)) ** 2) / n)
        out = {"mse": mse, "l1": l1, "l0": float(s[1] / n),
               "explained_variance": numerics.explained_variance(mse, var)}
        if jump:
            out.pop("l1")
            out["l0_loss"] = float(s[3])
            out["total"] = mse + float(s[3])
        elif self.spec.activation == "relu":
            out["total"] = mse + l1
        else:
            out["l1"] = 0.0
            out["aux"] = aux_loss
            out["total"] = mse + aux_loss
            if self.spec.activation == "batchtopk":
                m = float(every[:, 2].min())
                if np.isfinite(m) and m > 0:
                    lr_t = cfg.topk_threshold_lr
                    st.threshold = (1.0 - lr_t) * st.threshold + lr_t * m
        if bad:
            out.update(mse=float("nan"), total=float("nan"), explained_variance=float("nan"))
        return out

    def _adam(self, st, grads: dict, lr: float, g_log_threshold=None) -> int:
        cfg, p, state = st.config, st.params, st.state
        t = state.step + 1
        c = numerics.adam_constants(lr, cfg.beta1, cfg.beta2, cfg.eps, t)
        bad = 0
        for name in p.names:
            a = np.asarray(getattr(p, name))
            g = np.ascontiguousarray(grads[name], np.float32).reshape(-1)
            bad += adam_flat(a.reshape(-1), g, np.asarray(getattr(state.m, name)).reshape(-1),
                             np.asarray(getattr(state.v, name)).reshape(-1), c)
        state.step = t
        if g_log_threshold is not None:  # JumpReLU's thresholds, at the same step t
            bad += adam_flat(np.asarray(st.log_threshold), g_log_threshold,
                             np.asarray(st.threshold_m), np.asarray(st.threshold_v), c)
        # a non-finite value on any rank is a non-finite step everywhere
        return int(self.comm.allgather_rows(np.array([bad], np.int64)).sum())

    # ------------------------------------------------------------ evaluation
    def evaluate(self, x) -> dict:
        """``mse``, ``explained_variance``, ``l0`` of host rows ``x`` (every
        rank the same rows), with the inference codes."""
        st = self.state
        be, p = st.backend, st.params
        xi, y = st.pair(x)
        t = xi if y is None else y
        c = st.centering()
        if self.spec.activation == "batchtopk":  # a JumpReLU at inference
            thr = np.full(self.hi - self.lo, st.threshold, np.float32)
            codes = be.encode_jumprelu(xi, p.W_enc, p.b_enc, c, thr)
        else:
            codes = self._codes(be, xi, p, c)
        x_hat = self._x_hat(be, codes, p, xi).astype(np.float64)
        n = t.shape[0]
        mse = float(np.sum((x_hat - t) ** 2) / n)
        nnz = self.comm.allgather_rows(np.array([codes.to_host().nnz], np.int64)).sum()
        var = float(np.sum((t - t.mean(axis=0, dtype=np.float64)) ** 2) / n)
        return {"mse": mse, "explained_variance": numerics.explained_variance(mse, var),
                "l0": float(nnz) / n}

    # ------------------------------------------------------------ counts
    def global_counts(self, window) -> np.ndarray:
        """Every latent's firing count over the window (rank order: all latents)."""
        return np.concatenate(self.comm.allgather_ragged(window.counts()))

    # ------------------------------------------------------------ checks
    def replicated(self) -> list:
        st = self.state
        out = [np.asarray(st.params.b_dec), np.asarray(st.state.m.b_dec),
               np.asarray(st.state.v.b_dec), np.array([st.state.step], np.int64)]
        if st.params.W_skip is not None:
            out.append(np.asarray(st.params.W_skip))
        if hasattr(st, "threshold"):
            out.append(np.array([st.threshold], np.float64))
        return out

    def broadcast_replicated(self) -> None:
        st = self.state
        self.comm.bcast_arrays([np.asarray(st.params.b_dec)]
                               + ([np.asarray(st.params.W_skip)]
                                  if st.params.W_skip is not None else []))

    def check_same(self, step: int) -> None:
        self.comm.check_same(self.replicated(), f"after step {step}, the replicated "
                             "parameters (b_dec, its moments, the Adam step)")


# ================================================================ checkpoints
def write_shards(comm, run_dir, step: int, tensors: dict, run_state: dict, lo: int,
                 hi: int) -> Path:
    """Write this rank's checkpoint file, then (rank 0) the index
    ``run_dir/checkpoint.safetensors``; collective. The shard files of step
    ``S`` go to ``run_dir/checkpoint.shards/step-S/``; the index names that
    directory, and is written only after every rank's file is, so a crash
    leaves the previous checkpoint (index and shards) whole; older shard
    directories are removed after the index moves on."""
    run_dir = Path(run_dir)
    sub = Path(SHARDS_DIR) / f"step-{step:09d}"
    d = run_dir / sub
    d.mkdir(parents=True, exist_ok=True)
    R = comm.size
    name = f"rank-{comm.rank:05d}-of-{R:05d}.safetensors"
    shard_state = {**run_state, "shard": {"rank": comm.rank, "ranks": R, "lo": lo, "hi": hi}}
    write_checkpoint(d / name, tensors, shard_state)
    comm.barrier()
    path = run_dir / CHECKPOINT_FILENAME
    if comm.rank == 0:
        bounds = feature_bounds(int(run_state["model"]["d_sae"]), R)
        index = {**run_state, "feature_shards": {
            "dir": str(sub), "ranks": R, "bounds": [list(b) for b in bounds],
            "files": [f"rank-{r:05d}-of-{R:05d}.safetensors" for r in range(R)]}}
        write_checkpoint(path, {"feature_shards.bounds": np.array(bounds, np.int64)}, index)
        for old in (run_dir / SHARDS_DIR).iterdir():
            if old.is_dir() and old.name != sub.name:
                shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return path


def read_shards(run_dir, run_state: dict, lo: int, hi: int) -> dict:
    """The checkpoint tensors of latents ``lo:hi`` (``0:d_sae`` for all),
    assembled from the shard files the index ``run_state`` names; each file
    is verified (hashes, step) and only the overlapping ones are read."""
    run_dir = Path(run_dir)
    info = run_state["feature_shards"]
    d = run_dir / info["dir"]
    parts = []
    for (a, b), name in zip(info["bounds"], info["files"]):
        if b <= lo or a >= hi:
            continue
        path = d / name
        if not path.exists():
            raise SAEFormatError(f"{run_dir}: the feature-sharded checkpoint lacks {path} "
                                 "(every rank's file must be there)")
        tensors, st = read_checkpoint(path)
        if st.get("step") != run_state["step"]:
            raise SAEFormatError(f"{path} is from step {st.get('step')}, the index from "
                                 f"step {run_state['step']} (a mixed or damaged checkpoint)")
        parts.append((a, b, tensors))
    if not parts or parts[0][0] > lo or parts[-1][1] < hi:
        raise SAEFormatError(f"{run_dir}: the shard files do not cover latents {lo}:{hi}")
    out = {}
    for name, first in parts[0][2].items():
        ax = _SPLIT_AXIS.get(name)
        if ax is None:
            out[name] = first
            continue
        pieces = []
        for a, b, tensors in parts:
            s, e = max(a, lo) - a, min(b, hi) - a
            sl = [slice(None)] * tensors[name].ndim
            sl[ax] = slice(s, e)
            pieces.append(tensors[name][tuple(sl)])
        out[name] = np.ascontiguousarray(np.concatenate(pieces, axis=ax))
    return out


def slice_tensors(tensors: dict, lo: int, hi: int) -> dict:
    """Latents ``lo:hi`` of a whole checkpoint's tensors (the split ones
    sliced, the replicated ones as they are)."""
    out = {}
    for name, a in tensors.items():
        ax = _SPLIT_AXIS.get(name)
        if ax is None:
            out[name] = a
        else:
            sl = [slice(None)] * a.ndim
            sl[ax] = slice(lo, hi)
            out[name] = np.ascontiguousarray(a[tuple(sl)])
    return out


def load_sharded_sae(run_dir, backend=None) -> SparseAutoencoder:
    """The SAE of a feature-sharded run's checkpoint, in one process, folded
    back to raw inputs (as the single-process trainer's ``out_dir/sae``)."""
    from ..training.state import fold_params, make_state, model_from_info
    from ..training.config import TrainConfig
    run_dir = Path(run_dir)
    _, st = read_checkpoint(run_dir)
    if "feature_shards" not in st:
        raise SAEFormatError(f"{run_dir} holds no feature-sharded checkpoint")
    d_sae = int(st["model"]["d_sae"])
    tensors = read_shards(run_dir, st, 0, d_sae)
    model = model_from_info(st["model"], backend)
    state = make_state(model, TrainConfig.from_dict(st["config"]), model.backend)
    state.load(tensors, st["adam_step"])
    model.set_params(fold_params(state.host_params(), float(st["scale"])))
    if model.activation == "batchtopk":
        model.threshold = np.full(d_sae, float(np.asarray(tensors["topk.threshold"])[0]),
                                  np.float32)
    if model.activation == "jumprelu":  # the fold keeps pre-activations: thresholds carry over
        model.threshold = state.host_threshold()
    model.metadata["fastsae_training_steps"] = int(st["step"])
    return model
