"""Slurm: sbatch templates (pretrain.sbatch, export.sbatch), their rendering, and the one client module.

`launch.submit` renders and submits, `launch.status` reports; the trainer calls `client.requeue` on preemption.
"""
