"""Judged evaluation (MT-Bench and AlpacaEval style): `python jobs/evaluate.py --config <eval recipe> [key=value ...]`."""

from ray_zephyr.errors import run_cli
from ray_zephyr.evaluation.run import main

if __name__ == "__main__":
    run_cli(main)
