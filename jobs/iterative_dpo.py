"""Iterative on-policy DPO (rounds of generate, judge, binarize, dDPO):
`python jobs/iterative_dpo.py --config <iterative recipe> [key=value ...]`."""

from ray_zephyr.errors import run_cli
from ray_zephyr.iterative import main

if __name__ == "__main__":
    run_cli(main)
