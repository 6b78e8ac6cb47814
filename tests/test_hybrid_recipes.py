"""The linearization recipes with two-kind layers (lolcats, liger, lizard) and recipe=landmark end
to end on CPU: tiny sizes, one step per stage, from a fresh softmax model at CP 1, and the two-kind
layers' transfer stage at CP 2 (the teacher softmax, the window branch and the linear branch
each under its own strategy in one group)."""

import math

import pytest

from parallel.spawn import run_distributed
from tests.test_recipes_e2e import _train

pytestmark = [pytest.mark.e2e]
RECIPES = {"linearize_lolcats": 2, "linearize_liger": 1, "linearize_lizard": 2, "landmark": 1}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_runs_every_stage(recipe, tmp_path):
    n = RECIPES[recipe]
    short = [f"recipe.stages.{i}.steps=1" for i in range(n)] + ["model.hybrid_window=16", "model.landmark_every=15"]
    out = run_distributed(_train, 1, [f"recipe={recipe}", f"trainer.run_dir={tmp_path / 'r'}"] + short)[0]
    assert out["step"] == n and all(math.isfinite(x) for x in out["history"])


@pytest.mark.gloo
def test_lolcats_transfer_at_cp2(tmp_path):
    short = ["recipe.stages.0.steps=1", "recipe.stages.1.steps=1", "model.hybrid_window=16", "parallel.cp.size=2"]
    out = run_distributed(_train, 2, ["recipe=linearize_lolcats", f"trainer.run_dir={tmp_path / 'r'}"] + short)
    assert out[0]["history"] == out[1]["history"] and out[0]["step"] == 2
