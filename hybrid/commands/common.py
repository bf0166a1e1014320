"""Argument helpers shared by the commands that take a recipe."""

from __future__ import annotations

import argparse

from hybrid.recipe.recipe import Recipe, load_recipe


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", metavar="RECIPE", help="recipe YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set model.d_model=512 (repeatable; values are "
        "YAML: numbers, true/false, [lists])",
    )


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    return load_recipe(args.recipe, args.overrides)
