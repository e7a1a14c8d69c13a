"""The command line shared by the jobs: `--config <recipe> [key=value ...]`."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ray_zephyr.config import Recipe, load_recipe, shipped_recipes


def parse_recipe_args(
    description: str, argv: list[str] | None = None, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
) -> tuple[Recipe, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help=f"recipe file, or a shipped recipe: {', '.join(shipped_recipes())}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.lr=1e-5")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    return load_recipe(args.config, args.overrides), args
