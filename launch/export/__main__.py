"""`python -m launch.export`: see launch/export/main.py."""

import sys

from launch.cli import run_cli
from launch.export.main import main

sys.exit(run_cli(main))
