"""Data-parallel training: every rank holds the whole SAE and its share of
each batch.

One step of :class:`DataParallel` on ``R`` ranks, global batch ``B``:

1. rank ``r`` takes rows ``[r B / R, (r + 1) B / R)`` of the batch the
   single-process trainer would draw (:class:`RankBatchStream` reads only
   those rows from the data);
2. it encodes them with the backend's kernels (BatchTopK and Matryoshka:
   :func:`global_batchtopk` selects the ``B k`` largest pre-activations of
   the *global* batch) and computes its gradients with the backend's
   ``*_gradients`` function (the mean over its rows);
3. the gradients, each weighted by the rank's share of the rows
   ``n_r / B``, go into one float32 buffer, summed over ranks by one
   fixed-order all-reduce (:meth:`~fastsae.distributed.comm.Communicator.
   allreduce_sum`); the step's statistics (loss sums, firing counts, the
   batch's sums for its variance) go in one float64 all-gather;
4. every rank runs the same Adam update on the same bytes (Numba's
   ``adam_flat``), renormalizes unit-norm decoder rows, and advances the same
   dead-latent counters, so the ranks never drift; the trainer compares a
   parameter checksum across ranks every ``check_every`` steps.

Every loss fastsae trains is a mean over rows, so the weighted sum of the
ranks' gradients is the gradient of the global batch: with one rank the
update equals the fused single-process step within float32 rounding (the
kernels differ: gradients, then a separate Adam pass), and so it does with
several (the sum in step 3 adds float32 rounding of its own).

The single-process trainer keeps its fused step; only this mode splits it.
CPU backends only (the CUDA backend's arrays would make a host round trip
per step; not done yet).
"""

from __future__ import annotations

import numpy as np

from ..backends import numerics
from ..backends.numba.adam import adam_flat
from ..backends.reference import normalize_decoder_rows
from ..data import BatchStream
from ..params import SAEParams
from ..sparse import SparseCodes
from ..training.state import JumpReLUState, MatryoshkaState, SAEState, TopKState

__all__ = ["DataParallel", "RankBatchStream", "global_batchtopk", "rank_rows"]


def rank_rows(batch_size: int, rank: int, size: int) -> tuple[int, int]:
    """``(lo, hi)``: the rows of a ``batch_size`` batch that ``rank`` of
    ``size`` trains on (contiguous, sizes differ by at most one)."""
    return (rank * batch_size) // size, ((rank + 1) * batch_size) // size


class RankBatchStream(BatchStream):
    """:class:`~fastsae.data.BatchStream` that yields rows ``lo:hi`` of each
    batch the full stream would yield, bit for bit, reading only those rows
    from the source. Its position (and ``state_dict``) is the full stream's,
    so a checkpoint resumes on any rank count."""

    def __init__(self, source, batch_size: int, *, lo: int, hi: int, **kwargs):
        super().__init__(source, batch_size, **kwargs)
        if not 0 <= lo < hi <= self.batch_size:
            raise ValueError(f"rows {lo}:{hi} are not a part of a {self.batch_size}-row batch")
        self.lo, self.hi = int(lo), int(hi)

    def _reset_rows(self):
        super()._reset_rows()
        self._buf_key = None  # the (epoch, buffer) whose row numbers _buf holds
        self._buf = None

    def _buffer(self, epoch, b):
        """The source row numbers of buffer ``b``, in the order the full
        stream serves its rows (:meth:`BatchStream._served_rows` with each
        block at its own rows)."""
        if self._buf_key != (epoch, b):
            blocks = self._buffer_blocks(epoch, b)
            br = self.block_rows
            if self.shuffle:
                rows = self._served_rows(epoch, b, blocks, blocks * br)
            else:
                rows = np.arange(int(blocks[0]) * br,
                                 min((int(blocks[-1]) + 1) * br, self.source.n_rows))
            self._buf_key, self._buf = (epoch, b), rows
        return self._buf

    def next_batch(self) -> np.ndarray:
        """Rows ``lo:hi`` of the next batch (float32, C-contiguous, scaled)."""
        rows = np.empty(self.batch_size, np.int64)
        filled, n = 0, self.source.n_rows
        while filled < self.batch_size:
            epoch, r = divmod(self.position, n)
            _, _, starts = self._epoch_layout(epoch)
            b = int(np.searchsorted(starts, r, side="right")) - 1
            buf = self._buffer(epoch, b)
            lo = r - int(starts[b])
            take = min(self.batch_size - filled, buf.shape[0] - lo)
            rows[filled:filled + take] = buf[lo:lo + take]
            filled += take
            self.position += take
        out = np.ascontiguousarray(self.source.take(rows[self.lo:self.hi]), dtype=np.float32)
        if self.scale != 1.0:
            out *= np.float32(self.scale)
        return out


def global_batchtopk(comm, be, x, W_enc, b_enc, centering, k: int, n_global: int, *,
                     row_offset: int = 0, col_offset: int = 0,
                     d_total: int | None = None) -> SparseCodes:
    """This rank's part of the BatchTopK codes of the global batch.

    The single-process rule (``encode_batchtopk``): the ``M = n_global * k``
    largest pre-activations of the batch, ties to the lower row-major index,
    then ReLU. ``x`` is this rank's rows (host float32), rows ``row_offset``
    on of the batch, and ``W_enc``/``b_enc`` its latents, ``col_offset`` on of
    ``d_total`` (data-parallel: all the rows' share and every latent;
    feature-sharded: every row and a slice of the latents). Each rank takes
    its largest candidates (it cannot hold more than ``M`` winners), the
    ranks all-gather the candidates' values, and each finds the same cut:
    the ``M``-th largest value ``tau`` and everything above it; ties at
    ``tau`` are decided by their global row-major index, all-gathered (ties
    are rare in float data, so that message is short). Returns host
    :class:`~fastsae.sparse.SparseCodes` with this rank's column indices.
    """
    n, d_sae = x.shape[0], W_enc.shape[1]
    d_total = d_sae if d_total is None else int(d_total)
    M = n_global * k
    kk = min(d_sae, -(-M // n))
    cand = be.encode_batchtopk(x, W_enc, b_enc, centering, kk).to_host()
    vals = np.asarray(cand.values)
    top = vals if vals.size <= M else np.partition(vals, vals.size - M)[vals.size - M:]
    allv = np.concatenate(comm.allgather_ragged(np.ascontiguousarray(top, np.float32)))
    if allv.size <= M:
        return cand
    tau = np.partition(allv, allv.size - M)[allv.size - M]
    quota = M - int(np.count_nonzero(allv > tau))
    row_of = np.repeat(np.arange(n), np.diff(np.asarray(cand.indptr)))
    at_tau = np.flatnonzero(vals == tau)
    keys = ((row_offset + row_of[at_tau]).astype(np.int64) * d_total
            + col_offset + np.asarray(cand.indices)[at_tau])
    every = np.sort(np.concatenate(comm.allgather_ragged(keys)))
    keep = vals > tau
    keep[at_tau[np.isin(keys, every[:quota])]] = True
    counts = np.bincount(row_of[keep], minlength=n)
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    return SparseCodes(indptr, np.ascontiguousarray(cand.indices[keep]),
                       np.ascontiguousarray(vals[keep]), cand.shape)


class DataParallel:
    """The data-parallel step of a :class:`~fastsae.training.state.TrainingState`.

    ``comm``: a :class:`~fastsae.distributed.comm.Communicator`;
    ``batch_size``: the global batch. :meth:`step` is the distributed twin of
    ``state.step`` (same arguments, same returned metrics, for the global
    batch); the trainer calls it with this rank's rows.
    """

    def __init__(self, comm, state, batch_size: int):
        if not isinstance(state, SAEState):
            raise ValueError("data-parallel training trains SparseAutoencoder models (SAEs "
                             "and transcoders), not the plain Autoencoder")
        if getattr(state.backend, "DEVICE_ARRAYS", False):
            raise ValueError(f"data-parallel training runs on the CPU backends; backend "
                             f"{state.backend.name!r} computes on a device")
        self.comm, self.state, self.batch_size = comm, state, int(batch_size)
        if self.batch_size < comm.size:
            raise ValueError(f"a batch of {self.batch_size} rows cannot be split over "
                             f"{comm.size} ranks (at least one row each)")
        self.lo, self.hi = rank_rows(self.batch_size, comm.rank, comm.size)
        self._buf = None

    # ------------------------------------------------------------ the step
    def step(self, x, lr: float, coefficient: float, fire_counts) -> dict:
        """One step on this rank's host rows ``x`` (``[hi - lo, d_in]``, or a
        transcoder's ``[x | y]`` rows); returns the global batch's metrics."""
        st = self.state
        xi, y = st.pair(x)
        if isinstance(st, JumpReLUState):
            local = self._jumprelu(st, xi, y, coefficient)
        elif isinstance(st, TopKState):
            local = self._topk(st, xi, y)
        else:
            local = self._relu(st, xi, y, coefficient)
        loss, grads, g_extra, codes, dead_mask = local
        n = xi.shape[0]
        stats = self._stats(loss, codes, xi if y is None else y, st.n_features)
        total = self._reduce(st, grads, g_extra, n)
        every = self.comm.allgather_rows(stats)
        return self._update(st, lr, total, g_extra, every, dead_mask, fire_counts)

    # ---------------------------------------------------------- local parts
    def _reconstruct(self, be, codes, p: SAEParams, x):
        x_hat = np.asarray(be.decode(codes, p.W_dec, p.b_dec))
        if p.W_skip is not None:
            x_hat = x_hat + x @ np.asarray(p.W_skip).T
        return np.ascontiguousarray(x_hat, dtype=np.float32)

    def _relu(self, st, x, y, coefficient):
        be, p = st.backend, st.params
        codes = be.encode_relu_sparse(x, p.W_enc, p.b_enc, st.centering())
        x_hat = self._reconstruct(be, codes, p, x)
        loss, grads = be.gradients(x, p, codes, x_hat, l1_coefficient=coefficient,
                                   decoder_norm=st.model.decoder_norm, y=y)
        return loss, grads, None, codes, None

    def _aux_codes(self, st, x, dead_mask):
        """AuxK's codes: per row the ``k_aux`` largest pre-activations among
        the dead latents, ReLU (the backends' ``encode_topk`` on the dead
        columns: same selection rule, ties to the lower index)."""
        be, p = st.backend, st.params
        dead = np.flatnonzero(dead_mask)
        k = min(st.k_aux, dead.size)
        W = np.ascontiguousarray(np.asarray(p.W_enc)[:, dead])
        b = np.ascontiguousarray(np.asarray(p.b_enc)[dead])
        c = be.encode_topk(x, W, b, st.centering(), k).to_host()
        return SparseCodes(np.asarray(c.indptr), dead[np.asarray(c.indices)].astype(np.int32),
                           np.asarray(c.values), (x.shape[0], st.n_features))

    def _topk(self, st, x, y):
        be, p, cfg = st.backend, st.params, st.config
        if st.batch_selection:
            codes = global_batchtopk(self.comm, be, x, p.W_enc, p.b_enc, st.centering(), st.k,
                                     self.batch_size, row_offset=self.lo)
        else:
            codes = be.encode_topk(x, p.W_enc, p.b_enc, st.centering(), st.k)
        dead_mask = st.since >= st.dead_tokens if st.auxk else None
        aux_codes, weight = None, 0.0
        if st.auxk and numerics.auxk_active(dead_mask, st.k_aux, cfg.aux_coefficient):
            aux_codes = self._aux_codes(st, x, dead_mask)
            weight = numerics.auxk_weight(dead_mask, st.k_aux, cfg.aux_coefficient)
        x_hat = self._reconstruct(be, codes, p, x)
        if isinstance(st, MatryoshkaState):
            loss, grads = be.matryoshka_gradients(x, p, codes, np.asarray(st.widths, np.int64),
                                                  aux_codes, weight, y)
        else:
            loss, grads = be.topk_gradients(x, p, codes, x_hat, aux_codes, weight, y)
        return loss, grads, None, codes, dead_mask

    def _jumprelu(self, st, x, y, coefficient):
        be, p, cfg = st.backend, st.params, st.config
        dead_mask = st.since >= st.dead_tokens if st.pre_act else None
        loss, grads, g_lt = be.jumprelu_gradients(
            x, p, st.log_threshold, cfg.jumprelu_bandwidth, coefficient,
            None if st.sparsity.is_default else st.sparsity, dead_mask, y)
        # the codes for L0 and the firing counts (the gradients do not return them)
        theta = numerics.jumprelu_window(np.asarray(st.log_threshold), cfg.jumprelu_bandwidth)[0]
        codes = be.encode_jumprelu(x, p.W_enc, p.b_enc, st.centering(), theta)
        return loss, grads, np.asarray(g_lt, np.float32), codes, dead_mask

    # ------------------------------------------------------- communication
    def _stats(self, loss, codes, target, d_sae) -> np.ndarray:
        """float64 ``[8 + L + d_out + d_sae]``: this rank's sums (losses times
        its rows, nonzeros, rows, the target's sum of squares, its smallest
        kept activation), its prefix squared errors, its target column sums
        and its firing counts."""
        n = target.shape[0]
        c = codes.to_host() if hasattr(codes, "to_host") else codes
        vals = np.asarray(c.values)
        prefix = tuple(loss.prefix_mse or ())
        head = np.array([loss.mse * n, loss.l1 * n, loss.aux * n, loss.l0_loss * n, float(vals.size), float(n),
                         float(np.sum(np.square(target, dtype=np.float64))),
                         float(vals.min()) if vals.size else np.inf], np.float64)
        return np.concatenate([head, np.asarray(prefix, np.float64) * n,
                               target.sum(axis=0, dtype=np.float64),
                               np.bincount(np.asarray(c.indices), minlength=d_sae)
                               .astype(np.float64)])

    def _reduce(self, st, grads: SAEParams, g_extra, n: int) -> np.ndarray:
        """The rows-weighted sum over ranks of every gradient, in one float32
        buffer laid out as the parameters (then ``g_extra``)."""
        arrays = [np.asarray(a) for a in grads.arrays()]
        if g_extra is not None:
            arrays.append(g_extra)
        size = sum(a.size for a in arrays)
        if self._buf is None or self._buf.size != size:
            self._buf = np.empty(size, np.float32)
        w = np.float32(n / self.batch_size)
        o = 0
        for a in arrays:
            np.multiply(a.ravel(), w, out=self._buf[o:o + a.size])
            o += a.size
        return self.comm.allreduce_sum(self._buf)

    # ------------------------------------------------------------- update
    def _update(self, st, lr, total, g_extra, every, dead_mask, fire_counts) -> dict:
        cfg, p, state = st.config, st.params, st.state
        t = state.step + 1
        c = numerics.adam_constants(lr, cfg.beta1, cfg.beta2, cfg.eps, t)
        bad, o = 0, 0
        for name in p.names:
            a = np.asarray(getattr(p, name))
            g = total[o:o + a.size]
            bad += adam_flat(a.reshape(-1), g, np.asarray(getattr(state.m, name)).reshape(-1),
                             np.asarray(getattr(state.v, name)).reshape(-1), c)
            o += a.size
        state.step = t
        if g_extra is not None:  # JumpReLU's log-threshold, at the same step t
            lt = np.asarray(st.log_threshold)
            bad += adam_flat(lt, total[o:o + lt.size], np.asarray(st.threshold_m),
                             np.asarray(st.threshold_v), c)
        if isinstance(st, TopKState) or isinstance(st, JumpReLUState) \
                or st.model.decoder_norm == "unit_norm":
            normalize_decoder_rows(np.asarray(p.W_dec))
        return self._metrics(st, every, dead_mask, fire_counts, bad == 0)

    def _metrics(self, st, every, dead_mask, fire_counts, finite: bool) -> dict:
        s = every.sum(axis=0)  # rank order: every rank adds the same way
        B = self.batch_size
        d_sae = st.n_features
        counts = np.rint(s[-d_sae:]).astype(np.int64)
        n_prefix = every.shape[1] - 8 - d_sae - st.model.d_out
        col = s[8 + n_prefix:8 + n_prefix + st.model.d_out]
        var = (s[6] - float(col @ col) / B) / B
        mse = s[0] / B
        nnz = s[4]
        aux, l0_loss = s[2] / B, s[3] / B
        fields = {"mse": mse, "l1": s[1] / B, "l0": nnz / B,
                  "explained_variance": numerics.explained_variance(mse, var)}
        if isinstance(st, JumpReLUState):
            fields["l0_loss"] = l0_loss
            fields["total"] = mse + l0_loss + aux
            if st.pre_act:
                fields["aux"] = aux
        elif isinstance(st, TopKState):
            fields["l1"] = 0.0
            fields["aux"] = aux
            if isinstance(st, MatryoshkaState):
                pm = s[8:8 + n_prefix] / B
                fields["total"] = float(pm.sum()) + aux
                for w, key, m in zip(st.widths[:-1], st._prefix_keys, pm[:-1]):
                    fields[key] = numerics.explained_variance(float(m), var)
            else:
                fields["total"] = mse + aux
        else:
            fields["total"] = mse + fields["l1"]
        if not finite:
            fields = {k: (float("nan") if k in ("mse", "total", "explained_variance") else v)
                      for k, v in fields.items()}
        # the firing state every rank updates the same way
        if dead_mask is not None:  # AuxK or the pre-activation loss counts idle tokens
            fired = counts > 0
            st.since[fired] = 0
            st.since[~fired] += B
        if fire_counts is not None:
            fire_counts += counts
        if isinstance(st, TopKState) and st.batch_selection:
            m = float(every[:, 7].min())
            if np.isfinite(m) and m > 0:
                lr_t = st.config.topk_threshold_lr
                st.threshold = (1.0 - lr_t) * st.threshold + lr_t * m
        return {k: float(v) for k, v in fields.items()}

    # ------------------------------------------------------------ helpers
    def state_arrays(self) -> list:
        """Every array the ranks must hold identically (parameters, moments,
        JumpReLU's thresholds), contiguous host arrays."""
        st = self.state
        out = [np.asarray(a) for a in st.params.arrays()]
        out += [np.asarray(a) for a in st.state.m.arrays()]
        out += [np.asarray(a) for a in st.state.v.arrays()]
        if isinstance(st, JumpReLUState):
            out += [np.asarray(a) for a in (st.log_threshold, st.threshold_m, st.threshold_v)]
        return out

    def broadcast_state(self) -> None:
        """Make every rank's parameters, moments and counters rank 0's."""
        self.comm.bcast_arrays(self.state_arrays())
        st = self.state
        if hasattr(st, "since"):
            self.comm.bcast_arrays([st.since])
        if isinstance(st, TopKState):
            st.threshold = float(self.comm.bcast(st.threshold))
        st.state.step = int(self.comm.bcast(int(st.state.step)))

    def check_same(self, step: int) -> None:
        st = self.state
        extra = [st.since] if hasattr(st, "since") else []
        self.comm.check_same(self.state_arrays() + extra,
                             f"after step {step}, the parameters")
