"""Launchers: ``pretrain launch torchrun`` (one box or several) and ``pretrain launch slurm`` (sbatch).

Both validate the config before anything starts, set ``trainer.devices`` and
``trainer.num_nodes`` from their own process layout, and run ``python -m framework.cli fit``
on every rank; preemption and requeue are handled in the run by
``framework.training.callbacks.preemption``."""
