"""The sparse autoencoder a user holds: parameters, encode/decode, save/load.

``SparseAutoencoder`` keeps its parameters as float32 NumPy arrays in
SAELens layouts (``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]``) and runs every computation through
a fastsae backend (:func:`fastsae.get_backend`). It saves to and loads from
SAELens-format directories (see :mod:`fastsae.io`).
"""

from __future__ import annotations

import numpy as np

from .backends import validate as V
from .backends import Backend, get_backend
from . import io as _io
from .io import (is_gemma_scope, is_sparsify, read_gemma_scope, read_sae_dir, read_sparsify,
                 write_sae_dir)
from .params import DECODER_NORM_MODES, SAEParams
from .sparse import SparseCodes, check_codes

__all__ = ["SparseAutoencoder", "geometric_median", "ACTIVATIONS", "default_matryoshka_widths"]


def geometric_median(x, *, max_iter: int = 100, tol: float = 1e-6) -> np.ndarray:
    """Geometric median of the rows of ``x`` (Weiszfeld's algorithm, float64)."""
    x = np.asarray(x, dtype=np.float64)
    y = x.mean(axis=0)
    for _ in range(max_iter):
        d = np.linalg.norm(x - y, axis=1)
        w = 1.0 / np.maximum(d, 1e-12)
        y_new = (w[:, None] * x).sum(axis=0) / w.sum()
        if np.linalg.norm(y_new - y) <= tol * max(1.0, np.linalg.norm(y)):
            return y_new
        y = y_new
    return y


#: Training activations of :class:`SparseAutoencoder`.
ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk")

#: Activations that select a fixed number ``k`` of codes per row (on average).
TOPK_ACTIVATIONS = ("topk", "batchtopk", "matryoshka_batchtopk")


def default_matryoshka_widths(d_sae: int) -> list[int]:
    """``[d_sae/8, d_sae/4, d_sae/2, d_sae]`` (rounded down; repeated or zero
    widths dropped): four nested prefixes, each twice the one before."""
    out = []
    for w in (d_sae // 8, d_sae // 4, d_sae // 2, d_sae):
        if w >= 1 and (not out or w > out[-1]):
            out.append(w)
    return out


class SparseAutoencoder:
    """A one-layer sparse autoencoder.

    ``pre = (x - b_dec) @ W_enc + b_enc``, ``f = act(pre)``,
    ``x_hat = f @ W_dec + b_dec``, where ``act`` is ReLU (``activation="relu"``),
    the ``k`` largest entries of each row after ReLU (``"topk"``), for
    ``"batchtopk"`` the ``N * k`` largest of the batch during training and a
    per-feature threshold (JumpReLU, as SAELens runs BatchTopK SAEs) at
    inference, or for ``"jumprelu"`` ``pre * (pre > threshold)`` with learned
    per-feature thresholds (Rajamanoharan et al. 2024, Gemma Scope; trained
    with an L0 penalty, see :class:`fastsae.TrainConfig`).
    ``"matryoshka_batchtopk"`` (Bussmann et al. 2025) encodes as BatchTopK
    and trains nested prefixes of the dictionary: the loss sums the
    reconstruction errors of the first ``widths[0]``, ``widths[1]``, ...
    features, so the first features learn the most general directions.

    With ``transcoder=True`` (Dunefsky et al. 2024) the model reads one
    activation and reconstructs another: ``pre = x @ W_enc + b_enc`` (the
    input is not centred: ``b_dec`` is ``d_out`` wide), ``y_hat = f @ W_dec +
    b_dec`` with ``W_dec [d_sae, d_out]``, and with ``skip=True`` (a skip
    transcoder, Paulo et al. 2025) ``+ x @ W_skip.T``, ``W_skip [d_out,
    d_in]``. Every activation above can be a transcoder's.

    Parameters
    ----------
    d_in, d_sae : int
        Input width and number of features.
    transcoder : bool
        Reconstruct a target ``y`` of width ``d_out`` from ``x`` instead of ``x``.
    d_out : int, optional
        A transcoder's output width (default ``d_in``).
    skip : bool
        A transcoder with the affine skip connection ``x @ W_skip.T``
        (initialized to zero, as sparsify does).
    decoder_norm : ``"weighted_l1"`` or ``"unit_norm"``
        How training controls the decoder's scale (see
        :data:`fastsae.params.DECODER_NORM_MODES`). Default ``"weighted_l1"``
        for ReLU; TopK, BatchTopK and JumpReLU always use ``"unit_norm"``.
    activation : ``"relu"``, ``"topk"``, ``"batchtopk"``, ``"jumprelu"`` or
        ``"matryoshka_batchtopk"``
    k : int
        Active features per row (topk, batchtopk, matryoshka_batchtopk;
        required there).
    widths : sequence of int, optional
        ``matryoshka_batchtopk`` only: the prefix widths, strictly increasing
        and ending at ``d_sae`` (SAELens's ``matryoshka_widths``). Default
        :func:`default_matryoshka_widths`: ``[d_sae/8, d_sae/4, d_sae/2, d_sae]``.
    backend : str or Backend, optional
        Kernel backend; ``None`` picks the fastest usable one when first needed.
    seed : int
        Seeds the initialization.
    init_norm : float
        Initial norm of the decoder rows (``weighted_l1``; rows have unit norm
        in ``unit_norm`` mode) and of the encoder columns.
    precision : ``"fp32"`` or ``"bf16"``
        The default of :meth:`encode` and :meth:`sparse_encoder` (``"bf16"``:
        the bfloat16 encoders of :mod:`fastsae.backends.bf16`, CPU backends).
        Training has its own setting, :attr:`fastsae.TrainConfig.precision`.
        A loaded SAE encodes in ``"fp32"`` until this attribute is set.

    Initialization (April 2024 update and common practice): decoder rows point
    in random directions with a small fixed norm, ``W_enc = W_dec.T`` (tied
    init, scaled to ``init_norm`` in ``unit_norm`` mode), ``b_enc = 0`` and
    ``b_dec = 0`` (see :meth:`init_b_dec` to start it at the data's mean or
    geometric median). A transcoder's encoder columns are drawn on their own
    (random directions of norm ``init_norm``: its input and output spaces
    differ).
    """

    #: The default precision of :meth:`encode` (loaded SAEs: float32).
    precision = "fp32"

    def __init__(self, d_in: int, d_sae: int, *, decoder_norm: str | None = None,
                 backend=None, seed: int = 0, init_norm: float = 0.1,
                 activation: str = "relu", k: int | None = None, widths=None,
                 transcoder: bool = False, d_out: int | None = None, skip: bool = False,
                 precision: str = "fp32"):
        d_in = V.as_int(d_in, "d_in")
        #: The default precision of :meth:`encode` (``"fp32"`` or ``"bf16"``).
        self.precision = V.precision_arg(precision)
        d_sae = V.as_int(d_sae, "d_sae")
        if not isinstance(transcoder, bool) or not isinstance(skip, bool):
            raise TypeError("transcoder and skip must be True or False")
        if not transcoder and (d_out is not None or skip):
            raise ValueError("d_out and skip are for transcoders: pass transcoder=True")
        d_out = d_in if d_out is None else V.as_int(d_out, "d_out")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if activation in ("relu", "jumprelu"):
            if k is not None:
                raise ValueError("k is only used by the topk, batchtopk and "
                                 "matryoshka_batchtopk activations")
        if widths is not None and activation != "matryoshka_batchtopk":
            raise ValueError("widths are only used by the matryoshka_batchtopk activation")
        if activation == "relu":
            decoder_norm = "weighted_l1" if decoder_norm is None else decoder_norm
        elif activation == "jumprelu":
            if decoder_norm not in (None, "unit_norm"):
                raise ValueError("jumprelu SAEs train with unit-norm decoder rows "
                                 f"(decoder_norm='unit_norm'), got {decoder_norm!r}")
            decoder_norm = "unit_norm"
        else:
            if k is None:
                raise ValueError(f"activation {activation!r} needs k (active features per row)")
            k = V.as_int(k, "k")
            if k > d_sae:
                raise ValueError(f"k must be at most d_sae={d_sae}, got {k}")
            if decoder_norm not in (None, "unit_norm"):
                raise ValueError(f"{activation} SAEs train with unit-norm decoder rows "
                                 f"(decoder_norm='unit_norm'), got {decoder_norm!r}")
            decoder_norm = "unit_norm"
        if decoder_norm not in DECODER_NORM_MODES:
            raise ValueError(f"decoder_norm must be one of {DECODER_NORM_MODES}, "
                             f"got {decoder_norm!r}")
        init_norm = V.as_scalar(init_norm, "init_norm", low=0.0, low_inclusive=False)
        self.decoder_norm = decoder_norm
        self.seed = int(seed)
        self._backend_arg = backend
        self._backend = backend if isinstance(backend, Backend) else None
        rng = np.random.default_rng(self.seed)
        w = rng.standard_normal((d_sae, d_out))
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        dec_norm = 1.0 if decoder_norm == "unit_norm" else init_norm
        W_dec = (w * dec_norm).astype(np.float32)
        if transcoder:
            w = rng.standard_normal((d_sae, d_in))
            w /= np.linalg.norm(w, axis=1, keepdims=True)
        W_enc = np.ascontiguousarray((w * init_norm).T, dtype=np.float32)
        self.params = SAEParams(W_enc, np.zeros(d_sae, np.float32), W_dec,
                                np.zeros(d_out, np.float32),
                                np.zeros((d_out, d_in), np.float32) if skip else None)
        #: Whether this is a transcoder (input ``x``, target ``y`` of width ``d_out``).
        self.transcoder = transcoder
        #: How the SAE encodes (and is saved): ``"standard"`` (ReLU), ``"topk"``
        #: (``k`` largest pre-activations per row, then ReLU) or ``"jumprelu"``
        #: (``relu(pre) * (pre > threshold)``; a BatchTopK or Matryoshka SAE at
        #: inference).
        self.architecture = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu",
                             "jumprelu": "jumprelu",
                             "matryoshka_batchtopk": "jumprelu"}[activation]
        #: How the SAE trains: one of :data:`ACTIVATIONS`, or ``None`` for a
        #: loaded SAE fastsae cannot train.
        self.activation: str | None = activation
        self.k: int | None = k
        #: Matryoshka prefix widths (a list of int), ``None`` for other SAEs.
        self.widths: list[int] | None = None
        #: A loaded gated SAE's gate (``W_enc``, ``b_gate``, ``r_mag``; the
        #: parameters hold its magnitude path), ``None`` for other SAEs.
        self.gate: dict | None = None
        if activation == "matryoshka_batchtopk":
            self.widths = (default_matryoshka_widths(d_sae) if widths is None
                           else V.widths_arg(widths, d_sae).tolist())
        #: Per-feature threshold of the ``jumprelu`` architecture; a BatchTopK
        #: SAE fills it with the trainer's running estimate of the smallest
        #: kept activation, a JumpReLU SAE with its learned thresholds (0
        #: before training: plain ReLU; the trainer starts a fresh JumpReLU
        #: SAE at ``TrainConfig.jumprelu_init_threshold``).
        self.threshold: np.ndarray | None = (np.zeros(d_sae, np.float32)
                                             if self.architecture == "jumprelu"
                                             else None)
        #: Free-form information saved in cfg.json's metadata.
        self.metadata: dict = {}
        # True until trained or loaded: the Trainer then treats the parameters
        # as an initialization for normalized inputs and may set b_dec from data.
        self._fresh = True

    # ------------------------------------------------------------ attributes
    @property
    def d_in(self) -> int:
        return self.params.d_in

    @property
    def d_sae(self) -> int:
        return self.params.d_sae

    @property
    def d_out(self) -> int:
        """Width of the reconstruction: ``d_in`` for an SAE."""
        return self.params.d_out

    @property
    def skip(self) -> bool:
        """Whether this is a skip transcoder (it has ``W_skip``)."""
        return self.params.W_skip is not None

    W_enc = property(lambda self: self.params.W_enc)
    b_enc = property(lambda self: self.params.b_enc)
    W_dec = property(lambda self: self.params.W_dec)
    b_dec = property(lambda self: self.params.b_dec)
    W_skip = property(lambda self: self.params.W_skip)

    @property
    def fresh(self) -> bool:
        """``True`` until the parameters are trained, loaded or replaced with
        :meth:`set_params` (in-place edits of :attr:`params` keep it). A
        :class:`fastsae.Trainer` treats fresh parameters as an initialization
        for normalized inputs (and may set ``b_dec`` from the data), and other
        parameters as trained for raw inputs, which it rescales."""
        return self._fresh

    @property
    def backend(self) -> Backend:
        """The kernel backend (resolved on first use)."""
        if self._backend is None:
            self._backend = get_backend(self._backend_arg)
        return self._backend

    @backend.setter
    def backend(self, value) -> None:
        self._backend_arg = value
        self._backend = value if isinstance(value, Backend) else None

    def set_params(self, params: SAEParams) -> None:
        """Replace the parameters (validated; copied to float32 host arrays)."""
        p = V.params_arg(params)
        if (p.d_in, p.d_sae, p.d_out) != (self.d_in, self.d_sae, self.d_out):
            raise ValueError(f"parameters are for d_in={p.d_in}, d_sae={p.d_sae}, "
                             f"d_out={p.d_out}; this SAE has d_in={self.d_in}, "
                             f"d_sae={self.d_sae}, d_out={self.d_out}")
        if (p.W_skip is None) != (self.params.W_skip is None):
            raise ValueError("W_skip must be given exactly for a skip transcoder")
        self.params = SAEParams(*(np.array(a, dtype=np.float32, order="C") for a in p.arrays()))
        self._fresh = False

    def copy(self) -> "SparseAutoencoder":
        new = object.__new__(SparseAutoencoder)
        new.__dict__.update(self.__dict__)
        new.params = self.params.copy()
        new.metadata = dict(self.metadata)
        if self.threshold is not None:
            new.threshold = self.threshold.copy()
        if self.widths is not None:
            new.widths = list(self.widths)
        return new

    def __repr__(self) -> str:
        arch = "" if self.architecture == "standard" else f", architecture={self.architecture!r}"
        if self.activation in TOPK_ACTIVATIONS:
            arch = f", activation={self.activation!r}, k={self.k}"
        if self.widths is not None:
            arch += f", widths={self.widths}"
        if self.transcoder:
            arch += f", transcoder=True, d_out={self.d_out}" + (", skip=True" if self.skip else "")
        return (f"SparseAutoencoder(d_in={self.d_in}, d_sae={self.d_sae}, "
                f"decoder_norm={self.decoder_norm!r}{arch})")

    # ------------------------------------------------------------------ init
    def init_b_dec(self, x, method: str = "mean") -> None:
        """Set ``b_dec`` from data rows ``x [N, d_in]`` (a transcoder's target
        rows ``[N, d_out]``): their ``"mean"`` or ``"geometric_median"``."""
        x = V.as_float_array(x, "x", 2)
        V.check_dim("x", x.shape[1], self.d_out, "d_out (shape[1])" if self.transcoder
                    else "d_in (shape[1])")
        if method == "mean":
            c = x.astype(np.float64).mean(axis=0)
        elif method == "geometric_median":
            c = geometric_median(x)
        else:
            raise ValueError(f"method must be 'mean' or 'geometric_median', got {method!r}")
        self.params.b_dec[...] = c.astype(np.float32)

    # --------------------------------------------------------------- compute
    def _device_params(self) -> SAEParams:
        # CPU backends return the same arrays; the CUDA backend copies them over.
        return self.backend.to_backend(self.params)

    def _to_host(self, obj):
        if isinstance(obj, SparseCodes):
            return obj.to_host()
        return np.asarray(self.backend.to_numpy(obj))

    def _x(self, x):
        x = V.as_float_array(x, "x", 2)
        V.check_dim("x", x.shape[1], self.d_in, "d_in (shape[1])")
        return x

    def _centering(self, be, p):
        """What the encoders subtract from the input: ``b_dec``, or zeros for
        a transcoder (see :func:`fastsae.reference.input_centering`)."""
        if self.transcoder:
            return be.to_backend(np.zeros(self.d_in, np.float32))
        return p.b_dec

    def encode(self, x, sparse: bool = False, *, batch_size: int | None = None,
               precision: str | None = None):
        """Feature activations of ``x [N, d_in]``.

        Returns a dense float32 ``[N, d_sae]`` array, or with ``sparse=True``
        canonical :class:`fastsae.SparseCodes` (``.to_scipy()`` gives a
        ``scipy.sparse.csr_array``). ``batch_size`` bounds the working memory
        by encoding that many rows at a time.

        ``precision="bf16"`` (CPU backends; relu, topk and jumprelu
        architectures, transcoders included): the encoder product from
        bfloat16-rounded operands selects the active entries and their values
        are recomputed in float32, so only the support can differ from
        ``"fp32"``, at entries within the bfloat16 error of the cut (see
        :mod:`fastsae.backends.bf16`). On numba and cython the weights are
        packed once per call; the numpy backend computes the reference rule.
        ``None``: the model's :attr:`precision`.
        """
        precision = self.precision if precision is None else precision
        x = self._x(x)
        be, p = self.backend, self._device_params()
        c = self._centering(be, p)
        bs = x.shape[0] if batch_size is None else V.as_int(batch_size, "batch_size")
        if V.precision_arg(precision, allow_bf16=not be._device, backend=be.name) == "bf16":
            rows = self._bf16_encoder(be, p, c)
        elif self.architecture != "standard":
            def rows(xb):
                return self._to_host(self._encode_other(be, p, c, be.to_backend(xb)))
        elif sparse:
            def rows(xb):
                return self._to_host(be.encode_relu_sparse(be.to_backend(xb), p.W_enc, p.b_enc,
                                                           c))
        else:  # dense ReLU codes straight from the dense encoder
            return self._by_batch(x, bs, False, lambda xb: self._to_host(
                be.encode_relu(be.to_backend(xb), p.W_enc, p.b_enc, c)))
        return self._by_batch(x, bs, sparse, rows if sparse else (lambda xb: rows(xb).to_dense()))

    def _by_batch(self, x, bs, sparse, encode_rows):
        """``encode_rows`` (a batch of rows -> its codes, of the kind asked
        for) over ``bs``-row batches of ``x``, concatenated."""
        pieces = [encode_rows(x[lo:lo + bs]) for lo in range(0, x.shape[0], bs)]
        if not sparse:
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return _concat_codes(pieces, self.d_sae)

    def sparse_encoder(self, precision: str | None = None):
        """A function ``x [N, d_in] -> SparseCodes`` for encoding many batches:
        :meth:`encode` with ``sparse=True``, except that with
        ``precision="bf16"`` the weights are packed once, here (a snapshot:
        later changes to the parameters are not seen by the function).
        ``None``: the model's :attr:`precision`."""
        precision = self.precision if precision is None else precision
        be = self.backend
        if V.precision_arg(precision, allow_bf16=not be._device, backend=be.name) == "fp32":
            return lambda x: self.encode(x, sparse=True)
        p = self._device_params()
        enc = self._bf16_encoder(be, p, self._centering(be, p))
        return lambda x: enc(self._x(x))

    def _bf16_encoder(self, be, p, c):
        """A function ``x -> SparseCodes`` of this SAE's encoder in bf16."""
        arch = self.architecture
        if arch == "gated":
            raise ValueError("precision='bf16' does not run gated SAEs yet; use 'fp32'")
        if be.name == "numpy":
            if arch == "topk":
                return lambda xb: be.encode_topk(xb, p.W_enc, p.b_enc, c, self.k, precision="bf16")
            if arch == "jumprelu":
                return lambda xb: be.encode_jumprelu(xb, p.W_enc, p.b_enc, c, self.threshold,
                                                     precision="bf16")
            return lambda xb: be.encode_relu_sparse(xb, p.W_enc, p.b_enc, c, precision="bf16")
        from .backends.bf16 import BF16Encoder

        enc = BF16Encoder(p.W_enc, p.b_enc, c, threads=be.get_num_threads())
        if arch == "topk":
            return lambda xb: enc.topk(xb, self.k)
        if arch == "jumprelu":
            return lambda xb: enc.jumprelu(xb, self.threshold)
        return enc.relu

    def _encode_other(self, be, p, c, xb):
        if self.architecture == "topk":
            return be.encode_topk(xb, p.W_enc, p.b_enc, c, self.k)
        if self.architecture == "gated":
            # f = gate * mag: mag is the ReLU SAE in params; the gate is needed only
            # where mag > 0, one d_in dot product per active entry
            mag = be.encode_relu_sparse(xb, p.W_enc, p.b_enc, p.b_dec).to_host()
            g = self.gate
            xc = np.asarray(be.to_numpy(xb)) - self.params.b_dec
            rows = np.repeat(np.arange(mag.shape[0]), np.diff(mag.indptr))
            pre = np.einsum("ij,ji->i", xc[rows], g["W_enc"][:, mag.indices]) \
                + g["b_gate"][mag.indices]
            keep = pre > 0
            counts = np.bincount(rows[keep], minlength=mag.shape[0])
            return SparseCodes(np.concatenate(([0], np.cumsum(counts))).astype(np.int64),
                               mag.indices[keep], mag.values[keep], mag.shape)
        return be.encode_jumprelu(xb, p.W_enc, p.b_enc, c, be.to_backend(self.threshold))

    def decode(self, codes, *, width: int | None = None) -> np.ndarray:
        """``codes @ W_dec + b_dec`` for dense ``[N, d_sae]`` codes,
        :class:`SparseCodes` or any ``scipy.sparse`` matrix. With ``width``,
        only the first ``width`` features are decoded (a Matryoshka prefix's
        reconstruction). A skip transcoder's skip term needs the input: it is
        in :meth:`reconstruct`, not here (as SAELens's ``decode``)."""
        if not isinstance(codes, (SparseCodes, np.ndarray)) and hasattr(codes, "tocsr"):
            codes = SparseCodes.from_scipy(codes)
        if width is not None:
            width = V.as_int(width, "width")
            if width > self.d_sae:
                raise ValueError(f"width must be at most d_sae={self.d_sae}, got {width}")
            if not isinstance(codes, SparseCodes):
                codes = V.codes_arg(codes, self.d_sae).copy()
                codes[:, width:] = 0
            else:
                codes = check_codes(codes, self.d_sae).prefix(width)
        be, p = self.backend, self._device_params()
        if isinstance(codes, SparseCodes):
            codes = check_codes(codes, self.d_sae)
            dev = SparseCodes(*(be.to_backend(a) for a in (codes.indptr, codes.indices,
                                                            codes.values)), codes.shape)
            return self._to_host(be.decode(dev, p.W_dec, p.b_dec))
        codes = V.codes_arg(codes, self.d_sae)
        return self._to_host(be.decode(be.to_backend(codes), p.W_dec, p.b_dec))

    def reconstruct(self, x) -> np.ndarray:
        """``decode(encode(x))`` (through sparse codes); a skip transcoder
        adds ``x @ W_skip.T`` (SAELens's and sparsify's ``forward``)."""
        x = self._x(x)
        out = self.decode(self.encode(x, sparse=True))
        if self.skip:
            out += (x @ self.params.W_skip.T).astype(np.float32)
        return out

    def __call__(self, x) -> np.ndarray:
        return self.reconstruct(x)

    # ------------------------------------------------------------------- I/O
    def save(self, directory, *, metadata: dict | None = None, layout: str = "inference"):
        """Write ``cfg.json`` + ``sae_weights.safetensors`` in SAELens's format.

        The SAE works on raw activations; fastsae's own settings go into
        cfg.json's ``metadata``. Each file is written atomically.
        ``layout="training"`` (BatchTopK and Matryoshka SAEs only) writes
        SAELens's training save instead of its inference save: architecture
        ``batchtopk`` / ``matryoshka_batchtopk`` with the threshold as the
        float64 scalar ``topk_threshold``, which SAELens's
        ``TrainingSAE.load_from_disk`` reads (its ``SAE.load_from_disk`` reads
        only the inference save).

        Transcoders save as SAELens's ``transcoder`` / ``skip_transcoder``
        (ReLU) or ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``
        (JumpReLU, and BatchTopK or Matryoshka at their threshold, as their
        SAE twins); a TopK transcoder, which SAELens has no class for, saves
        in EleutherAI sparsify's layout (``cfg.json`` + ``sae.safetensors``,
        :func:`fastsae.io.write_sparsify`), which sparsify and fastsae load.
        SAELens has no training save of a transcoder: ``layout="training"``
        refuses one.
        """
        if layout not in ("inference", "training"):
            raise ValueError(f"layout must be 'inference' or 'training', got {layout!r}")
        batch = self.activation in ("batchtopk", "matryoshka_batchtopk")
        if layout == "training" and not batch:
            raise ValueError("layout='training' is for batchtopk and matryoshka_batchtopk "
                             f"SAEs (SAELens saves other SAEs one way); this one is "
                             f"{self.activation or self.architecture!r}")
        if layout == "training" and self.transcoder:
            raise ValueError("layout='training' is for SAEs: SAELens has no training save "
                             "of a transcoder (save it with the default layout)")
        meta = {"fastsae_decoder_norm": self.decoder_norm}
        meta.update(self.metadata)
        details = meta.get("training_architecture_details")
        details = dict(details) if isinstance(details, dict) else {}
        if batch:
            # SAELens's layout for a BatchTopK SAE saved for inference: a jumprelu
            # SAE, training settings only in the metadata; decoder rows are unit
            # norm here, so there are no decoder norms to fold into the weights.
            meta["training_architecture"] = self.activation
            details.update(k=int(self.k), rescale_acts_by_decoder_norm=False)
            if self.widths is not None:
                details.update(matryoshka_widths=list(self.widths),
                               use_matryoshka_aux_loss=False)
            meta["training_architecture_details"] = details
        elif self.activation == "jumprelu":
            meta["training_architecture"] = "jumprelu"
        if metadata:
            meta.update(metadata)
        if layout == "training":
            thr = np.unique(self.threshold)
            if thr.size != 1:
                raise ValueError("a BatchTopK training save holds one threshold; this SAE's "
                                 "per-feature thresholds differ")
            return write_sae_dir(directory, self.params, meta, architecture=self.activation,
                                 k=self.k, threshold=float(thr[0]), widths=self.widths,
                                 training=details)
        k = self.k if self.architecture == "topk" else None
        arch = self.architecture
        if self.transcoder:
            if arch == "topk":
                return _io.write_sparsify(directory, self.params, self.k, transcoder=True,
                                      metadata=meta)
            arch = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}[arch]
            if self.skip:
                arch = arch.replace("transcoder", "skip_transcoder")
        return write_sae_dir(directory, self.params, meta, architecture=arch,
                             k=k, threshold=self.threshold, gate=self.gate)

    @classmethod
    def load(cls, directory, *, backend=None,
             transcoder: bool | None = None) -> "SparseAutoencoder":
        """Load a fastsae- or SAELens-written SAE directory: ``"standard"``
        (ReLU), ``"topk"`` or ``"jumprelu"`` (e.g. a BatchTopK SAE saved for
        inference). All can be trained further: a ``jumprelu`` SAE with
        metadata ``training_architecture: "batchtopk"`` and its ``k`` as a
        BatchTopK SAE, any other ``jumprelu`` SAE (SAELens's JumpReLU saves,
        Gemma Scope) as JumpReLU; training a JumpReLU SAE needs positive
        thresholds (they are learned as ``log(threshold)``). ``directory`` may
        also be Gemma Scope's published layout: a ``params.npz`` file or a
        directory holding one (see :func:`fastsae.io.read_gemma_scope`), or
        an EleutherAI sparsify TopK SAE's or transcoder's directory
        (``cfg.json`` and ``sae.safetensors``, see
        :func:`fastsae.io.read_sparsify`). SAELens's four transcoder
        architectures (``transcoder``, ``skip_transcoder``,
        ``jumprelu_transcoder``, ``jumprelu_skip_transcoder``) load as
        trainable transcoders. A SAELens ``gated`` SAE loads and runs (not
        trains); SAELens's BatchTopK and Matryoshka training saves load as
        trainable SAEs. ``transcoder`` applies to Gemma Scope's layout only,
        whose file does not say whether it holds a transcoder: ``None``
        decides by the widths (``W_dec``'s differing from ``W_enc``'s input
        width), ``True`` reads a transcoder of equal widths.

        Unknown cfg fields are ignored; a missing required field, another
        architecture or tensors that do not match the cfg raise
        :class:`fastsae.io.SAEFormatError` (a ``ValueError``). Nothing is
        unpickled. Weights may be float32, float64, float16 or bfloat16; they
        are converted to float32 (exactly, except float64, which is rounded).
        """
        if transcoder is not None and not is_gemma_scope(directory):
            raise ValueError("transcoder= applies to Gemma Scope's params.npz only; other "
                             "formats say whether they hold a transcoder")
        if is_gemma_scope(directory):
            params, cfg, extras = read_gemma_scope(directory, transcoder=transcoder)
        elif is_sparsify(directory):
            params, cfg, extras = read_sparsify(directory)
        else:
            params, cfg, extras = read_sae_dir(directory)
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        mode = meta.get("fastsae_decoder_norm", "weighted_l1")
        if mode not in DECODER_NORM_MODES:
            mode = "weighted_l1"
        sae = cls.__new__(cls)
        sae.decoder_norm = mode
        sae.seed = 0
        sae._backend_arg = backend
        sae._backend = backend if isinstance(backend, Backend) else None
        sae.params = params
        sae._fresh = False
        sae.transcoder = bool(extras.get("transcoder", False))
        sae.architecture = cfg.get("architecture", "standard")
        if sae.transcoder:
            # a transcoder runs as its SAE twin, on an uncentred input
            sae.architecture = {"transcoder": "standard", "skip_transcoder": "standard",
                                "jumprelu_transcoder": "jumprelu",
                                "jumprelu_skip_transcoder": "jumprelu"}.get(sae.architecture,
                                                                          sae.architecture)
        sae.k = extras.get("k")
        sae.threshold = extras.get("threshold")
        sae.widths = extras.get("widths")
        sae.gate = extras.get("gate")
        sae.activation = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu",
                          "matryoshka_batchtopk": "matryoshka_batchtopk"}.get(sae.architecture)
        if sae.architecture == "matryoshka_batchtopk":
            sae.architecture = "jumprelu"  # SAELens's training save; it runs as jumprelu
        details = meta.get("training_architecture_details")
        trained_as = meta.get("training_architecture")
        if (sae.architecture == "jumprelu" and trained_as in ("batchtopk", "matryoshka_batchtopk")
                and sae.activation == "jumprelu" and isinstance(details, dict)):
            # a BatchTopK or Matryoshka SAE saved for inference: trainable further
            k = details.get("k")
            widths = details.get("matryoshka_widths")
            if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= sae.d_sae:
                if trained_as == "batchtopk":
                    sae.activation, sae.k = "batchtopk", k
                else:
                    try:
                        sae.widths = V.widths_arg(widths, sae.d_sae).tolist()
                        sae.activation, sae.k = "matryoshka_batchtopk", k
                    except (TypeError, ValueError):
                        pass  # not trainable as Matryoshka: runs (and trains) as JumpReLU
        if sae.activation in ("topk", "batchtopk", "jumprelu", "matryoshka_batchtopk"):
            sae.decoder_norm = "unit_norm"
        sae.metadata = {k: v for k, v in meta.items()
                        if k not in ("fastsae_version", "fastsae_decoder_norm",
                                     "sae_lens_version", "sae_lens_training_version")}
        return sae


def _concat_codes(pieces, d_sae: int) -> SparseCodes:
    if len(pieces) == 1:
        return pieces[0]
    n = sum(p.shape[0] for p in pieces)
    indptr = np.zeros(n + 1, dtype=np.int64)
    row, off = 0, 0
    for p in pieces:
        m = p.shape[0]
        indptr[row + 1:row + m + 1] = np.asarray(p.indptr[1:], dtype=np.int64) + off
        row += m
        off += int(p.indptr[-1])
    indices = np.concatenate([np.asarray(p.indices, dtype=np.int32) for p in pieces])
    values = np.concatenate([np.asarray(p.values, dtype=np.float32) for p in pieces])
    return SparseCodes(indptr, indices, values, (n, d_sae))
