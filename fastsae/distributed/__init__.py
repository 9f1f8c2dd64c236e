"""Past one machine: data-parallel training over MPI, encoding on Dask.

Nothing here imports mpi4py or dask until it is used, so ``import
fastsae`` works without the optional extras; a command that needs one says
which extra to install (``pip install 'fastsae[mpi]'`` or ``'fastsae[dask]'``).

Modules:

- :mod:`fastsae.distributed.comm`: the MPI communicator fastsae uses (a
  fixed-order all-reduce, broadcasts, parameter checksums, abort on error);
- :mod:`fastsae.distributed.data_parallel`: the data-parallel training step
  (gradients on each rank's rows, one fused all-reduce, the same Adam update
  on every rank) and the rank's share of each batch;
- :mod:`fastsae.distributed.encode`: one Dask task per data shard, codes
  written per shard.
"""
