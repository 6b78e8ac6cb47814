"""Attention transfer (LoLCATs stage 1, trainer/distill.py): each linear layer's output matches
the softmax attention of its own projections (MSE, layer-wise), no next-token loss."""

from __future__ import annotations

from trainer.distill import AttentionTransfer, transfer_loss_value
from trainer.objectives import Objective, register_objective


@register_objective("attention_transfer")
class AttentionTransferObjective(Objective):
    metric = "transfer_mse"
    extra_kinds = ("softmax",)  # the teacher's attention, under the softmax kind's CP strategy

    @classmethod
    def check(cls, cfg, where):
        if "linear" not in cfg.model.kinds():
            raise ValueError(
                f"{where}.objective=attention_transfer needs linear layers: set "
                "overrides.model.mixer_pattern, e.g. [linear, linear, linear, softmax]"
            )

    def loss(self, dp_model, batch, ctx):
        with AttentionTransfer(self.model, self.cfg.model.sliding_window) as at:
            dp_model(batch["input_ids"], batch["positions"], ctx)
        loss = at.loss()
        return loss, transfer_loss_value(loss), 1
