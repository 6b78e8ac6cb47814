"""Logit distillation (X-EcoMLA's recovery stage): the student's next-token distribution matches
a frozen teacher's, KL(teacher || student) summed over the labelled tokens; ``logit_distill_lm``
adds the next-token cross-entropy (equal weights). The teacher runs without gradients.

The teacher is the run's ``init_from`` (a Hugging Face directory or a longctx run dir) as it
was: the student's model settings with the mixers of that start (softmax for a Hugging Face
checkpoint, the run's own pattern for a run dir). Both produce full logits [B, T, V] per
micro-batch (no chunked head): fine for the vocabularies the recipe targets on one device row,
heavy for 128K vocabularies at long length (use a smaller micro-batch there).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from trainer.batching import batch_loss
from trainer.objectives import Objective, register_objective


def distill_kl(student_logits, teacher_logits, labels) -> torch.Tensor:
    """sum over tokens with labels != -100 of KL(softmax(teacher) || softmax(student)), fp32.
    [B, T, V], [B, T, V], [B, T] -> scalar; 0 when the logits agree."""
    keep = labels != -100
    s = F.log_softmax(student_logits[keep].float(), dim=-1)
    t = F.log_softmax(teacher_logits[keep].float(), dim=-1)
    return (t.exp() * (t - s)).sum()


def teacher_model(cfg, device) -> torch.nn.Module:
    """The frozen teacher of ``cfg.init_from`` (module docstring), on ``device``, eval mode."""
    import os

    from models.llama import Transformer
    from trainer import checkpoint, init_from
    from trainer.stages import carry_weights

    path = cfg.init_from
    if init_from.is_run_dir(path):
        meta, state = checkpoint.load_run_weights(path)
        pattern = meta.get("config", {}).get("model", {}).get("mixer_pattern") or ["softmax"]
    elif path is not None and os.path.isdir(path):
        from models.hf_io import load_hf_checkpoint

        _, state = load_hf_checkpoint(path)
        pattern = ["softmax"]
    else:
        raise ValueError(
            f"init_from={path!r}: objective logit_distill needs the frozen teacher: set init_from=RUN_OR_HF_DIR"
        )
    model = Transformer(dataclasses.replace(cfg.model, mixer_pattern=list(pattern)))
    counts = carry_weights(state, model, expand_kv=False, where=None)
    if counts["new"]:
        raise ValueError(f"init_from={path!r} does not hold every teacher weight ({counts}): check model.*")
    return model.to(device).eval().requires_grad_(False)


@register_objective("logit_distill")
class LogitDistill(Objective):
    metric = "distill_kl"
    extra_kinds = ("softmax",)  # the teacher's layers, under the softmax kind's CP strategy
    lm_weight = 0.0

    def __init__(self, cfg, model, mesh, teacher: torch.nn.Module | None = None):
        super().__init__(cfg, model, mesh)
        self.teacher = teacher if teacher is not None else teacher_model(cfg, next(model.parameters()).device)

    def loss(self, dp_model, batch, ctx):
        with torch.no_grad():
            t_logits = self.teacher(batch["input_ids"], batch["positions"], ctx)
        s_logits = dp_model(batch["input_ids"], batch["positions"], ctx)
        total = distill_kl(s_logits, t_logits, batch["labels"])
        if self.lm_weight:
            ce = F.cross_entropy(s_logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="sum")
            total = total + self.lm_weight * ce
        return batch_loss(total, batch["labels"], self.mesh)


@register_objective("logit_distill_lm")
class LogitDistillLM(LogitDistill):
    """KL to the teacher plus the next-token cross-entropy (logged together as distill_kl_lm)."""

    metric = "distill_kl_lm"
    lm_weight = 1.0
