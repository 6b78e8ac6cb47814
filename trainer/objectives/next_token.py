"""The next-token objective: summed cross-entropy through the model's loss head, scaled by
``world_size / global token count`` (trainer.batching.batch_loss). Also accepted as ``lm``."""

from __future__ import annotations

from trainer.batching import batch_loss
from trainer.objectives import Objective, register_objective


@register_objective("next_token", "lm")
class NextToken(Objective):
    def loss(self, dp_model, batch, ctx):
        ce = dp_model(batch["input_ids"], batch["positions"], ctx, labels=batch["labels"])
        return batch_loss(ce, batch["labels"], self.mesh)
