"""Multi-stage runs: a recipe is a list of stages, each the run's settings plus its overrides.

The trainer runs the stages in order in one run dir (global step numbers continue across
stages). A stage starts from the previous stage's final weights (or, for the first stage,
from ``init_from`` or a fresh initialisation) and may change the model:

    same name, same shape                  -> copied
    k/v projection, a whole multiple wider -> each kv head repeated (GQA softmax -> linear
                                              mixers, which have no GQA; ``expand_kv``)
    anything else the new model has        -> its own initialisation (seeded: trainer.seed +
                                              stage index), e.g. feature maps start as identity
    parameters the new model lacks         -> dropped

Then LoRA factors are attached (``lora_rank``), parameters outside ``train_params`` are frozen,
and the optimizer is new (``optimizer=reset``) or carries the AdamW moments of parameters
with the same name and shape (``keep``). At a stage's end LoRA is merged into the weights.
"""

from __future__ import annotations

import dataclasses
import fnmatch

import torch
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from trainer.config import StageConfig, TrainConfig, reject_unknown_keys
from trainer.objectives import objective_class


@dataclasses.dataclass
class Stage:
    index: int
    spec: StageConfig
    cfg: TrainConfig  # the run's settings with the stage's overrides
    offset: int  # global step at which the stage starts
    count: int = 1  # stages in the run
    staged: bool = False  # from a recipe (False: the run's own settings, one stage)

    @property
    def end(self) -> int:
        return self.offset + self.spec.steps


def plan(cfg: TrainConfig) -> list[Stage]:
    """The stages of ``cfg`` (one implicit stage without a recipe); ValueError naming the setting
    for a bad stage (checked on every rank before any collective)."""
    if not cfg.recipe.stages:
        return [Stage(0, StageConfig(name="train", steps=cfg.trainer.steps), cfg, 0)]
    base = OmegaConf.structured(cfg)
    base.recipe = OmegaConf.structured(type(cfg.recipe))  # stages do not nest
    out, offset = [], 0
    for i, spec in enumerate(cfg.recipe.stages):
        where = f"recipe.stages[{i}] ({spec.name})"
        overrides = OmegaConf.create(spec.overrides)
        reject_unknown_keys(overrides, TrainConfig, f"{where}.overrides.")
        try:
            merged = OmegaConf.merge(base, overrides, {"trainer": {"steps": spec.steps}})
            stage_cfg = OmegaConf.to_object(merged)
        except (ValidationError, ValueError) as e:
            msg = getattr(e, "msg", str(e))
            raise ValueError(f"{where}.overrides: {str(msg).splitlines()[0]}: fix the value") from None
        if spec.steps < 1:
            raise ValueError(f"{where}.steps={spec.steps} must be >= 1")
        objective_class(spec.objective, where).check(stage_cfg, where)  # trainer/objectives
        if spec.optimizer not in ("reset", "keep"):
            raise ValueError(f"{where}.optimizer={spec.optimizer!r} is unknown: choose reset or keep")
        if spec.lora_rank < 0:
            raise ValueError(f"{where}.lora_rank={spec.lora_rank} must be >= 0 (0: no LoRA)")
        out.append(Stage(i, spec, stage_cfg, offset, len(cfg.recipe.stages), True))
        offset += spec.steps
    return out


@torch.no_grad()
def carry_weights(src: dict[str, torch.Tensor], model: torch.nn.Module, expand_kv: bool = True) -> dict[str, int]:
    """Copy ``src`` (parameter name -> tensor) into ``model`` by the rules of the module
    docstring; returns counts {copied, expanded, new, dropped}."""
    counts = {"copied": 0, "expanded": 0, "new": 0, "dropped": 0}
    params = dict(model.named_parameters())
    for name, p in params.items():
        old = src.get(name)
        if old is not None and old.shape == p.shape:
            p.copy_(old)
            counts["copied"] += 1
        elif old is not None and expand_kv and _expandable(name, old, p):
            p.copy_(_expand_heads(old, p.shape[0] // old.shape[0], model.cfg.hd))
            counts["expanded"] += 1
        else:
            counts["new"] += 1
    counts["dropped"] = sum(1 for k in src if k not in params)
    return counts


def _expandable(name: str, old: torch.Tensor, new: torch.Tensor) -> bool:
    return (
        name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias"))
        and old.dim() == new.dim()
        and old.shape[1:] == new.shape[1:]
        and new.shape[0] % old.shape[0] == 0
    )


def _expand_heads(w: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """[Hkv * D, ...] -> [Hkv * groups * D, ...], kv head j serving query heads j*groups.. (as
    models/ops/attention's GQA does)."""
    heads = w.reshape(w.shape[0] // head_dim, head_dim, *w.shape[1:])
    return heads.repeat_interleave(groups, dim=0).reshape(-1, *w.shape[1:])


def freeze(model: torch.nn.Module, patterns: list[str], where: str) -> int:
    """requires_grad only for parameters matching one of ``patterns`` (all when empty);
    returns the number of trainable parameters (ValueError when none)."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(not patterns or any(fnmatch.fnmatchcase(name, pat) for pat in patterns))
        n += p.numel() if p.requires_grad else 0
    if n == 0:
        raise ValueError(f"{where}.train_params={patterns} match no parameter: use patterns such as '*.q_map.*'")
    return n


def carry_optimizer_state(old_opt, old_model, new_opt, new_model) -> int:
    """optimizer=keep: AdamW state of each parameter whose name and shape are unchanged."""
    old_by_name = {n: old_opt.state.get(p) for n, p in old_model.named_parameters()}
    carried = 0
    for name, p in new_model.named_parameters():
        st = old_by_name.get(name)
        if st and p.requires_grad and st["exp_avg"].shape == p.shape:
            new_opt.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
            carried += 1
    return carried
