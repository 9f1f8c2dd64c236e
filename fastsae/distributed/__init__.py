"""Past one machine: data-parallel and feature-sharded training over MPI,
and encoding shard sets on Dask.

Nothing here imports mpi4py or Dask until it is used, so ``import
fastsae`` works without the optional extras; a command that needs one says
which extra to install (``pip install 'fastsae[mpi]'``, ``'fastsae[dask]'``).

Modules:

- :mod:`fastsae.distributed.comm`: the MPI communicator fastsae uses (a
  fixed-order all-reduce, broadcasts, parameter checksums, abort on error);
- :mod:`fastsae.distributed.data_parallel`: the data-parallel training step
  (gradients on each rank's rows, one fused all-reduce, the same Adam update
  on every rank) and the rank's share of each batch;
- :mod:`fastsae.distributed.features`: feature-sharded training (each rank
  a slice of the latents; :class:`FeatureShardedSAE` describes the model,
  :func:`load_sharded_sae` assembles a run's SAE in one process);
- :mod:`fastsae.distributed.encode`: one task per data shard, in this
  process or on a Dask cluster, codes written per shard with an index
  (:func:`~fastsae.distributed.encode.encode_to_dir`,
  :func:`~fastsae.distributed.encode.read_encoded`).
"""

__all__ = ["FeatureShardedSAE", "load_sharded_sae"]


def __getattr__(name):
    if name in __all__:
        from . import features
        return getattr(features, name)
    raise AttributeError(f"module 'fastsae.distributed' has no attribute {name!r}")
