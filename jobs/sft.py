"""Zephyr dSFT: `python jobs/sft.py --config <recipe> [key=value ...]` (see ray_zephyr.train)."""

from ray_zephyr.errors import run_cli
from ray_zephyr.train.launch import main

if __name__ == "__main__":
    run_cli(lambda: main("sft"))
