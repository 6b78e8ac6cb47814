"""Multi-stage runs: a recipe is a list of stages, each the run's settings plus its overrides.

The trainer runs the stages in order in one run dir (global step numbers continue across
stages). A stage starts from the previous stage's final weights (or, for the first stage,
from ``init_from`` or a fresh initialisation), or from those of the earlier stage its
``start_from`` names (a branch: the README's worked example converts one extended model three
ways, each conversion its own stages), and may change the model:

    same name, same shape                  -> copied
    k/v projection, a whole multiple wider -> each kv head repeated (GQA softmax -> linear
                                              mixers, which have no GQA; ``expand_kv``)
    softmax layer that became mla          -> SVD of its q/k/v projections (X-EcoMLA,
                                              trainer/upcycle.py), o_proj copied
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
import re

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
    source: int | None = None  # index of the stage whose final weights it starts from (None: first)

    @property
    def end(self) -> int:
        return self.offset + self.spec.steps


def plan(cfg: TrainConfig) -> list[Stage]:
    """The stages of ``cfg`` (one implicit stage without a recipe), each on the model a Hugging
    Face ``init_from`` defines (trainer/init_from.py); ValueError naming the setting for a bad
    stage (checked on every rank before any collective)."""
    from trainer import init_from

    cfg = init_from.resolve(cfg)  # a Hugging Face init_from defines the model of every stage
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
        out.append(Stage(i, spec, stage_cfg, offset, len(cfg.recipe.stages), True, _source(cfg, i, where)))
        offset += spec.steps
    return out


def _source(cfg: TrainConfig, i: int, where: str) -> int | None:
    """Index of the stage whose weights stage ``i`` starts from: the one its ``start_from`` names
    (exactly one earlier stage), else the stage before (None for the first)."""
    name = cfg.recipe.stages[i].start_from
    if name is None:
        return i - 1 if i > 0 else None
    found = [j for j, s in enumerate(cfg.recipe.stages[:i]) if s.name == name]
    if len(found) != 1:
        names = [s.name for s in cfg.recipe.stages[:i]]
        raise ValueError(
            f"{where}.start_from={name!r} must name exactly one earlier stage (earlier: {names}): "
            "give it one of those names, each used once"
        )
    if found[0] != i - 1 and cfg.recipe.stages[i].optimizer == "keep":
        raise ValueError(
            f"{where}.optimizer=keep carries the moments of the stage before, not of start_from={name!r}: "
            "set optimizer=reset"
        )
    return found[0]


def branch_points(plan: list[Stage]) -> set[int]:
    """Indices of the stages a later stage starts from out of order (``start_from``): the trainer
    keeps their final weights and always checkpoints their end (so a resumed run finds them)."""
    return {st.source for st in plan if st.source is not None and st.source != st.index - 1}


@torch.no_grad()
def carry_weights(
    src: dict[str, torch.Tensor], model: torch.nn.Module, expand_kv: bool = True, where: str | None = "weights carried"
) -> dict[str, int]:
    """Copy ``src`` (parameter name -> tensor) into ``model`` by the rules of the module
    docstring; returns counts {copied, expanded, new, dropped}. Unless ``where`` is None, a
    model that changed (anything expanded, new or dropped) is reported on rank 0 in one line:
    the counts and the names (layer indices folded, ``carry_report``)."""
    counts = {"copied": 0, "expanded": 0, "new": 0, "dropped": 0}
    names: dict[str, list[str]] = {k: [] for k in counts}
    params = dict(model.named_parameters())
    for name, p in params.items():
        old = src.get(name)
        if old is not None and old.shape == p.shape:
            p.copy_(old)
            kind = "copied"
        elif old is not None and expand_kv and _expandable(name, old, p):
            p.copy_(_expand_heads(old, p.shape[0] // old.shape[0], model.cfg.hd))
            kind = "expanded"
        else:
            kind = "new"
        counts[kind] += 1
        names[kind].append(name)
    names["dropped"] = [k for k in src if k not in params]
    counts["dropped"] = len(names["dropped"])
    from trainer.upcycle import svd_init_mla

    for layer in svd_init_mla(src, model):  # softmax -> mla layers: SVD of the old projections
        for kind in ("copied", "new"):
            moved = [n for n in names[kind] if n.startswith(f"layers.{layer}.mixer.")]
            names[kind] = [n for n in names[kind] if n not in moved]
            names.setdefault("svd", []).extend(moved)
            counts[kind] -= len(moved)
            counts["svd"] = counts.get("svd", 0) + len(moved)
    if where is not None and (counts["expanded"] or counts.get("svd") or counts["new"] or counts["dropped"]):
        from parallel.mesh import env_ranks

        if env_ranks()[0] == 0:
            print(f"[longctx] {where}: {carry_report(names, dict(params), src)}", flush=True)
    return counts


def carry_report(names: dict[str, list[str]], params: dict, src: dict) -> str:
    """``copied 30 (1.2M), expanded 6 (...): layers.{0,1,2}.mixer.k_proj.weight, ...; new ...``:
    counts, parameter totals and names with the layer indices folded (at most 6 per kind)."""
    parts = []
    for kind, found in names.items():
        if not found:
            continue
        numel = sum((src if kind == "dropped" else params)[n].numel() for n in found)
        part = f"{kind} {len(found)} ({numel / 1e6:.3g}M)"
        if kind != "copied":
            folded = _fold(found)
            part += ": " + ", ".join(folded[:6]) + (f" and {len(folded) - 6} more" if len(folded) > 6 else "")
        parts.append(part)
    return "; ".join(parts)


def _fold(names: list[str]) -> list[str]:
    """['layers.0.a', 'layers.2.a', 'norm.w'] -> ['layers.{0,2}.a', 'norm.w'] (first-seen order)."""
    groups: dict[str, list[str]] = {}
    for n in names:
        m = re.match(r"layers\.(\d+)\.(.*)", n)
        key, idx = (m[2], m[1]) if m else (n, None)
        groups.setdefault(key, []).append(idx)
    out = []
    for key, idx in groups.items():
        if idx == [None]:
            out.append(key)
        else:
            out.append(f"layers.{idx[0]}.{key}" if len(idx) == 1 else f"layers.{{{','.join(idx)}}}.{key}")
    return out


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
