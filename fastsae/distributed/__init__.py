"""Past one machine: data-parallel and feature-sharded training over MPI.

Nothing here imports mpi4py until it is used, so ``import
fastsae`` works without the optional extra; a command that needs it says
which extra to install (``pip install 'fastsae[mpi]'``).

Modules:

- :mod:`fastsae.distributed.comm`: the MPI communicator fastsae uses (a
  fixed-order all-reduce, broadcasts, parameter checksums, abort on error);
- :mod:`fastsae.distributed.data_parallel`: the data-parallel training step
  (gradients on each rank's rows, one fused all-reduce, the same Adam update
  on every rank) and the rank's share of each batch;
- :mod:`fastsae.distributed.features`: feature-sharded training (each rank
  a slice of the latents; :class:`FeatureShardedSAE` describes the model,
  :func:`load_sharded_sae` assembles a run's SAE in one process).
"""

__all__ = ["FeatureShardedSAE", "load_sharded_sae"]


def __getattr__(name):
    if name in __all__:
        from . import features
        return getattr(features, name)
    raise AttributeError(f"module 'fastsae.distributed' has no attribute {name!r}")
