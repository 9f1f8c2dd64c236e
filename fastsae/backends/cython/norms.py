"""Decoder row norms and the L1 subgradient of the ``cython`` backend
(compiled ``_norms``). Arrays come from the validating front: C-contiguous
float32, canonical :class:`SparseCodes` with ``shape[1] == len(norms)``.
"""

from __future__ import annotations

import numpy as np

from ...sparse import SparseCodes
from . import _norms
from ._threads import threads


def decoder_column_norms(W_dec):
    """L2 norm of each decoder row of ``W_dec [d_sae, d_in]``, float32 ``[d_sae]``."""
    out = np.empty(W_dec.shape[0], dtype=np.float32)
    _norms.decoder_column_norms(W_dec, out, threads(W_dec.size))
    return out


def l1_subgradient(codes, norms, l1_coefficient):
    """``l1_coefficient * norms_j`` where ``f_ij > 0`` (dense in, dense out;
    sparse in, sparse out with the same pattern)."""
    c = np.float32(l1_coefficient)
    if isinstance(codes, SparseCodes):
        vals = np.empty(codes.indices.shape[0], dtype=np.float32)
        _norms.l1_sparse(codes.indices, codes.values, norms, c, vals,
                         threads(codes.indices.shape[0]))
        return SparseCodes(codes.indptr.copy(), codes.indices.copy(), vals, codes.shape)
    out = np.empty(codes.shape, dtype=np.float32)
    _norms.l1_dense(codes, norms, c, out, threads(codes.size))
    return out
