"""AI feedback (UltraFeedback-style pairs from your prompts): `python jobs/aif.py --config <aif recipe> [key=value ...]`."""

from ray_zephyr.aif.run import main
from ray_zephyr.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
