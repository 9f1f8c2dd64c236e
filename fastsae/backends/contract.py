"""The kernel contract: what every backend implements, declared in code.

A backend is a package ``fastsae.backends.<name>`` (the NumPy reference is
the module :mod:`fastsae.backends.reference`) whose face (its
``__init__``) defines every name in :data:`ATTRIBUTES` and
:data:`FUNCTIONS`. The registry (:mod:`fastsae.backends`) checks this when
it loads a backend and refuses one that lacks any name, naming what is
missing (:func:`missing`). The validating front, :class:`fastsae.Backend`,
calls these functions directly, after validating every argument once; the
functions trust what the front hands them.

Conventions of every entry below:

* arrays are float32 and C-contiguous (``int64`` ``indptr``/``fire_counts``,
  ``int32`` ``indices``, ``bool`` ``dead_mask``), in SAELens layouts:
  ``x [N, d_in]``, ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
  ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``;
* transcoders: every gradient and training function takes ``y`` last
  (``None``: an SAE, whose target is ``x``). Given ``y [N, d_out]``, the
  encoder reads ``x`` uncentered, the parameters have ``W_dec [d_sae,
  d_out]``, ``b_dec [d_out]`` and, for a skip transcoder, ``params.W_skip
  [d_out, d_in]`` (added as ``x @ W_skip.T``, trained by Adam with the
  rest); losses, AuxK and explained variance are taken against ``y``. The
  encoders' ``b_dec`` argument is the input centering: an SAE passes its
  ``b_dec``, a transcoder zeros (``reference.input_centering``);
* ``codes`` are dense ``[N, d_sae]`` or canonical :class:`~fastsae.SparseCodes`
  (CSR, sorted unique column indices per row);
* ``params`` is :class:`~fastsae.SAEParams`, ``state`` :class:`~fastsae.AdamState`;
* "in place" arguments are updated where they are, nothing else is written;
* a device backend (``DEVICE_ARRAYS``) also accepts and returns its own
  device arrays.

The semantics of each function are those of the NumPy reference
(:mod:`fastsae.backends.reference`), the oracle every backend is tested
against.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Attribute", "Function", "ATTRIBUTES", "FUNCTIONS", "NAMES", "FAMILIES",
           "missing", "function"]


@dataclass(frozen=True)
class Attribute:
    """A module-level constant every backend face defines."""

    name: str
    type: type
    doc: str


@dataclass(frozen=True)
class Function:
    """One contract function.

    ``args`` are ``(name, description)`` pairs in call order (keyword-only
    arguments after a ``"*"`` entry); ``returns`` describes the result;
    ``inplace`` names the arguments the function updates; ``family`` groups
    twins for the contract tests (``forward``, ``backward``, ``training``,
    ``topk``, ``placement``, ``runtime``).
    """

    name: str
    family: str
    args: tuple
    returns: str
    inplace: tuple = ()
    doc: str = ""

    @property
    def arg_names(self) -> tuple:
        return tuple(a for a, _ in self.args if a != "*")


_X = ("x", "float32 [N, d_in]")
_W_ENC = ("W_enc", "float32 [d_in, d_sae]")
_B_ENC = ("b_enc", "float32 [d_sae]")
_B_DEC = ("b_dec", "float32 [d_in]")
_W_DEC = ("W_dec", "float32 [d_sae, d_in]")
_CODES = ("codes", "dense float32 [N, d_sae] or SparseCodes (canonical CSR)")
_PARAMS = ("params", "SAEParams")
_PARAMS_IO = ("params", "SAEParams, updated in place")
_STATE = ("state", "AdamState (moments of params' shapes, step), updated in place")
_X_HAT = ("x_hat", "float32 [N, d_out], the reconstruction of codes (with the skip term)")
_Y = ("y", "float32 [N, d_out] or None: a transcoder's target (None: an SAE)")
_ADAM = (("lr", "float > 0"), ("beta1", "float in [0, 1)"), ("beta2", "float in [0, 1)"),
         ("eps", "float > 0"))
_FIRE = ("fire_counts", "int64 [d_sae] or None; += rows each feature fired in")
_ENC = (_X, _W_ENC, _B_ENC, _B_DEC)
_PRECISION = (("*", ""), ("precision", "'fp32' or 'bf16': the encoder product from bfloat16-"
              "rounded operands selects the entries, whose values stay float32 (CPU "
              "backends; see fastsae.backends.bf16)"))
_LOG_THETA = ("log_threshold", "float32 [d_sae]: JumpReLU thresholds are exp(log_threshold)")
_BANDWIDTH = ("bandwidth", "float > 0: width of the rectangle kernel")
_L0C = ("l0_coefficient", "float >= 0")
_SPARSITY = ("sparsity", "JumpReLUSparsity or None (None: 'step', no pre-activation loss)")
_PRE_DEAD = ("dead_mask", "bool [d_sae] or None: the features the pre-activation loss "
             "acts on (None: none)")
_WIDTHS = ("widths", "int64 [L] host array: strictly increasing prefix widths, the last d_sae")
_AUXK = (("dead_mask", "bool [d_sae] or None"), ("k_aux", "int >= 0"),
         ("aux_coefficient", "float >= 0"))

ATTRIBUTES = (
    Attribute("NAME", str, "the backend's registry name"),
    Attribute("DESCRIPTION", str, "one line for available_backends(): version, threads, build"),
    Attribute("DEVICE_ARRAYS", bool, "whether the backend computes on device arrays (cuda)"),
    Attribute("AUTO_SELECT", bool, "whether automatic choice may pick it (not the CUDA simulator)"),
)

FUNCTIONS = (
    # ------------------------------------------------------------ runtime
    Function("check_available", "runtime", (), "None; raises with the reason when unusable here"),
    Function("get_num_threads", "runtime", (), "int: compute threads a kernel call uses"),
    Function("set_num_threads", "runtime", (("n", "int >= 1, or None for the default"),),
             "None", doc="threads for later calls in this process"),
    # ------------------------------------------------------------ placement
    Function("to_backend", "placement", (("obj", "array, SAEParams or AdamState"),),
             "the same object where the backend computes (unchanged on CPU backends)"),
    Function("to_numpy", "placement", (("obj", "array, SAEParams or AdamState"),),
             "host NumPy arrays (unchanged on CPU backends)"),
    Function("synchronize", "placement", (), "None; waits for queued device work"),
    # ------------------------------------------------------------ forward
    Function("encode_relu", "forward", _ENC,
             "float32 [N, d_sae]: relu((x - b_dec) @ W_enc + b_enc)"),
    Function("encode_relu_sparse", "forward", (*_ENC, *_PRECISION),
             "SparseCodes [N, d_sae]: encode_relu without a dense N x d_sae array"),
    Function("decode", "forward", (_CODES, _W_DEC, _B_DEC),
             "float32 [N, d_in]: codes @ W_dec + b_dec"),
    Function("decoder_column_norms", "forward", (_W_DEC,),
             "float32 [d_sae]: L2 norm of each row of W_dec"),
    Function("l1_subgradient", "forward",
             (_CODES, ("norms", "float32 [d_sae]"), ("l1_coefficient", "float >= 0")),
             "same kind as codes: l1_coefficient * norms[j] where codes > 0"),
    # ------------------------------------------------------------ backward / training
    Function("gradients", "backward",
             (_X, _PARAMS, _CODES, _X_HAT, ("l1_coefficient", "float >= 0"),
              ("decoder_norm", "'weighted_l1' or 'unit_norm'"), _Y),
             "(Losses, SAEParams of gradients)"),
    Function("train_step", "training",
             (_PARAMS_IO, _STATE, _X, ("*", ""), ("l1_coefficient", "float >= 0"), _ADAM[0],
              ("decoder_norm", "'weighted_l1' or 'unit_norm'"), *_ADAM[1:], _FIRE, _Y,
              _PRECISION[1]),
             "StepResult (losses, L0, explained variance of the batch, before the update)",
             inplace=("params", "state", "fire_counts")),
    # ------------------------------------------------------------ TopK family
    Function("encode_topk", "topk", (*_ENC, ("k", "int >= 1"), *_PRECISION),
             "SparseCodes: per row the k largest pre-activations (ties: lower index), ReLU"),
    Function("encode_batchtopk", "topk", (*_ENC, ("k", "int >= 1"), *_PRECISION),
             "SparseCodes: the N*k largest pre-activations of the batch (row-major ties), ReLU"),
    Function("encode_jumprelu", "topk", (*_ENC, ("threshold", "float32 [d_sae]"), *_PRECISION),
             "SparseCodes: relu(pre) * (pre > threshold)"),
    Function("topk_gradients", "topk",
             (_X, _PARAMS, _CODES, _X_HAT,
              ("aux_codes", "SparseCodes [N, d_sae] of the AuxK selection, or None"),
              ("aux_weight", "float >= 0"), _Y),
             "(Losses with aux, SAEParams of gradients; W_dec's projected)"),
    Function("train_step_topk", "topk",
             (_PARAMS_IO, _STATE, _X, ("*", ""), ("k", "int >= 1"),
              ("activation", "'topk' or 'batchtopk'"), *_ADAM, _FIRE, *_AUXK, _Y,
              ("precision", "'fp32' or 'bf16'; see encode_topk and encode_batchtopk")),
             "StepResult with aux and extra['min_active']",
             inplace=("params", "state", "fire_counts")),
    # ------------------------------------------------------------ JumpReLU family
    Function("jumprelu_gradients", "jumprelu",
             (_X, _PARAMS, _LOG_THETA, _BANDWIDTH, _L0C, _SPARSITY, _PRE_DEAD, _Y),
             "(Losses with l0_loss and aux (the pre-activation loss), SAEParams of gradients (W_dec's projected), "
             "float32 [d_sae] gradient of log_threshold)"),
    Function("train_step_jumprelu", "jumprelu",
             (_PARAMS_IO, _STATE, _X, ("*", ""), _LOG_THETA,
              ("threshold_m", "float32 [d_sae], Adam's first moment of log_threshold"),
              ("threshold_v", "float32 [d_sae], Adam's second moment of log_threshold"),
              _BANDWIDTH, _L0C, *_ADAM, _FIRE, _SPARSITY, _PRE_DEAD, _Y,
              ("precision", "'fp32' or 'bf16' (bf16: the default sparsity mode, 'step' with no "
               "pre-activation loss acting); the entries above the window's low edge "
               "selected by the bfloat16 product")),
             "StepResult with extra['l0_loss'] and aux (before the update)",
             inplace=("params", "state", "log_threshold", "threshold_m", "threshold_v",
                      "fire_counts")),
    # ------------------------------------------------------------ Matryoshka family
    Function("matryoshka_gradients", "matryoshka",
             (_X, _PARAMS, _CODES, _WIDTHS,
              ("aux_codes", "SparseCodes [N, d_sae] of the AuxK selection, or None"),
              ("aux_weight", "float >= 0"), _Y),
             "(Losses with prefix_mse (one per width) and aux, SAEParams of gradients; "
             "W_dec's projected)"),
    Function("train_step_matryoshka", "matryoshka",
             (_PARAMS_IO, _STATE, _X, ("*", ""), ("k", "int >= 1"), _WIDTHS, *_ADAM, _FIRE,
              *_AUXK, _Y, ("precision", "'fp32' or 'bf16'; see encode_batchtopk")),
             "StepResult with aux, extra['min_active'] and extra['prefix_mse'] (a tuple, "
             "one per width; the last is mse)",
             inplace=("params", "state", "fire_counts")),
)

#: Every name a backend face must define.
NAMES = tuple(a.name for a in ATTRIBUTES) + tuple(f.name for f in FUNCTIONS)

#: Function names by family (the contract tests pair twins by family).
FAMILIES = {fam: tuple(f.name for f in FUNCTIONS if f.family == fam)
            for fam in dict.fromkeys(f.family for f in FUNCTIONS)}

_BY_NAME = {f.name: f for f in FUNCTIONS}


def function(name: str) -> Function:
    """The declaration of contract function ``name``."""
    return _BY_NAME[name]


def missing(module) -> list[str]:
    """Contract names ``module`` lacks or defines with the wrong kind (a
    non-callable function, an attribute of the wrong type); empty when the
    module implements the whole contract."""
    out = []
    for a in ATTRIBUTES:
        if not isinstance(getattr(module, a.name, None), a.type):
            out.append(a.name)
    for f in FUNCTIONS:
        if not callable(getattr(module, f.name, None)):
            out.append(f.name)
    return out
