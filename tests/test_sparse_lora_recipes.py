"""recipe=longlora (S^2-Attn) and recipe=sinklora (SF-Attn), LoRA+ on q/k/v/o with trainable
embeddings and norms, end to end on CPU: tiny sizes, two steps, from a fresh model, and
sinklora at CP 2 (its mask through the all-gather strategy) following CP 1."""

import math

import pytest

from parallel.spawn import run_distributed
from tests.test_recipes_e2e import _train

pytestmark = [pytest.mark.e2e]
SHORT = ["recipe.stages.0.steps=2", "model.mask_args.group=16", "trainer.eval_position_buckets=0"]


@pytest.mark.parametrize("recipe", ["longlora", "sinklora"])
def test_recipe_runs(recipe, tmp_path):
    out = run_distributed(_train, 1, [f"recipe={recipe}", f"trainer.run_dir={tmp_path / 'r'}"] + SHORT)[0]
    assert out["step"] == 2 and all(math.isfinite(x) for x in out["history"])


@pytest.mark.gloo
def test_sinklora_at_cp2_follows_cp1(tmp_path):
    common = ["recipe=sinklora"] + SHORT
    one = run_distributed(_train, 1, common + [f"trainer.run_dir={tmp_path / 'one'}"])[0]["history"]
    two = run_distributed(_train, 2, common + ["parallel.cp.size=2", f"trainer.run_dir={tmp_path / 'two'}"])
    assert two[0]["history"] == two[1]["history"]
    assert all(abs(a - b) < 1e-5 for a, b in zip(one, two[0]["history"])), (one, two[0]["history"])
