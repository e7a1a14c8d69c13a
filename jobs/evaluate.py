"""Judged evaluation (MT-Bench and AlpacaEval style): `python jobs/evaluate.py --config <eval recipe> [key=value ...]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout sent with --working-dir needs no install

from ray_zephyr.errors import run_cli  # noqa: E402
from ray_zephyr.evaluation.run import main  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
