"""The command line of every recipe job (training, AIF, evaluation, preview): `--config <recipe> [key=value ...]`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from ray_zephyr.config import Recipe, RecipeKind, load_recipe, shipped_recipes
from ray_zephyr.runtime import VERBOSE_ENV


def parse_recipe_args(
    description: str,
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    kind: type[RecipeKind] = Recipe,
) -> tuple[RecipeKind, argparse.Namespace]:
    """The recipe of `kind` (a file, or a shipped one by name) with the command line's overrides, and the args."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True,
                        help=f"recipe file, or a shipped one: {', '.join(shipped_recipes(kind))}")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides (dotted keys, values read as YAML), e.g. seed=7")
    add_verbose_flag(parser)
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    apply_verbose_flag(args)
    return load_recipe(args.config, args.overrides, kind), args


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="print Ray's own INFO logs too (Data's operator progress, Train's worker-group lines)")


def apply_verbose_flag(args: argparse.Namespace) -> None:
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # before Ray starts: its processes take their log level from init_ray
