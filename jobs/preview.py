"""Preview a recipe's data: python jobs/preview.py --config tiny-sft [key=value ...] [--rows N]"""

from ray_zephyr.cli import parse_recipe_args
from ray_zephyr.errors import run_cli


def main() -> None:
    recipe, args = parse_recipe_args(
        "Show what a recipe's data pipeline produces",
        add_arguments=lambda p: p.add_argument("--rows", type=int, default=None, help="look at the first N rows only"),
    )
    from ray_zephyr.data.preview import preview
    from ray_zephyr.models import load_tokenizer
    from ray_zephyr.runtime import init_ray
    from ray_zephyr.train.launch import check_inputs

    check_inputs(recipe)  # before Ray starts, as the training jobs do
    tokenizer = load_tokenizer(recipe)
    init_ray()
    print(preview(recipe, tokenizer, args.rows))


if __name__ == "__main__":
    run_cli(main)
