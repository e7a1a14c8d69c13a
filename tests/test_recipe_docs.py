"""docs/recipes.md's key reference is what the recipe schemas say: regenerate it when a key changes."""

from __future__ import annotations

from ray_zephyr.recipe_docs import DOCS, MARKER, updated


def test_recipe_reference_is_current():
    text = DOCS.read_text()
    assert MARKER in text, f"{DOCS} has no generated reference; run python -m ray_zephyr.recipe_docs --write"
    assert text == updated(text), f"{DOCS} is out of date; run python -m ray_zephyr.recipe_docs --write"


def test_every_key_has_a_meaning():
    missing = [line.split("|")[1].strip() for line in updated("").splitlines()
               if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not missing, f"keys without a description (give their Field a description=): {missing}"
