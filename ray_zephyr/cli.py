"""The command line of every recipe job (training, AIF, evaluation, preview): `--config <recipe> [key=value ...]`."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ray_zephyr.config import Recipe, RecipeKind, load_recipe, shipped_recipes


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
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    return load_recipe(args.config, args.overrides, kind), args
