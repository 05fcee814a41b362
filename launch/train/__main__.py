"""`python -m launch.train`: see launch/train/main.py."""

from launch.cli import run_cli
from launch.train.dist import exit_skipping_teardown
from launch.train.main import main

# everything the run writes (checkpoints, summary, metrics, TensorBoard, loader workers) is closed by now
exit_skipping_teardown(run_cli(main))
