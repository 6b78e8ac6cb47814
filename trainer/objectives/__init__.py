"""Stage objectives: what a training step minimises (``recipe.stages[i].objective``).

    objective = build_objective(cfg, model, mesh, name)    # once per stage
    loss, value_sum, count = objective.loss(dp_model, batch, ctx)
    engine.backward(loss, last)                            # the trainer logs value_sum / count

``loss`` is what backward gets (scaled as trainer.batching.batch_loss scales the next-token loss:
the engine averages gradients over every rank); ``value_sum / count`` summed over micro-batches is
the logged value, under the key ``metric``. An objective that runs a mixer kind the model's layers
do not use (attention transfer runs softmax as the teacher) lists it in ``extra_kinds``: the
trainer builds that kind's CP strategy too. An objective that needs more (a teacher model for
logit distillation) builds it in its constructor from ``cfg``.

A new objective is one module in this package: a subclass of ``Objective`` decorated
``@register_objective("name")``. Every module here is imported (and so registered) below.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

OBJECTIVES: dict[str, type] = {}  # objective name (and aliases) -> Objective subclass


def register_objective(name: str, *aliases: str):
    def wrap(cls):
        cls.name = name
        for n in (name, *aliases):
            OBJECTIVES[n] = cls
        return cls

    return wrap


class Objective:
    name = "objective"
    metric = "loss"  # the metrics.jsonl key of the logged training value
    extra_kinds: tuple[str, ...] = ()  # mixer kinds run besides the model's layers' own

    def __init__(self, cfg, model: torch.nn.Module, mesh):
        """``model``: the plain (unwrapped) model of the stage."""
        self.cfg, self.model, self.mesh = cfg, model, mesh

    @classmethod
    def check(cls, cfg, where: str) -> None:
        """Local checks of the stage settings ``cfg`` (ValueError naming ``where``)."""

    def loss(self, dp_model, batch: dict, ctx) -> tuple[torch.Tensor, float, int]:
        """(loss to backward, logged value summed over this micro-batch, its count)."""
        raise NotImplementedError


def objective_class(name: str, where: str = "recipe.stages[0]") -> type:
    if name not in OBJECTIVES:
        raise ValueError(f"{where}.objective={name!r} is unknown: choose one of {tuple(OBJECTIVES)}")
    return OBJECTIVES[name]


def build_objective(cfg, model, mesh, name: str) -> Objective:
    return objective_class(name)(cfg, model, mesh)


for _module in pkgutil.iter_modules(__path__):  # registration: every objective module
    importlib.import_module(f"{__name__}.{_module.name}")
