"""Low-rank adaptation (LoRA) of plain ``nn.Linear`` projections, in plain PyTorch.

A LoRA layer keeps the base projection's parameter names (``q_proj.weight``) and adds
``q_proj.lora_A`` [r, in] and ``q_proj.lora_B`` [out, r]:

    y = x W^T + b + (alpha / r) * (x A^T) B^T          x [..., in] -> y [..., out]

B starts at zero, so an attached model computes exactly what it did before. ``merge_lora``
folds W <- W + (alpha / r) B A and puts plain ``nn.Linear`` modules back (what a Hugging Face
export or the next stage sees); peft's names (``base_layer.weight``) would break our stable
parameter names, hence this small equivalent (same maths, same A/B initialisation).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a rank-``r`` update; shares the base layer's weight and bias."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft

    def forward(self, x):
        return super().forward(x) + self.scale * nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)

    def delta(self) -> torch.Tensor:
        """(alpha / r) B A [out, in]: what merging adds to the weight."""
        return self.scale * self.lora_B @ self.lora_A


def attach_lora(model: nn.Module, targets: list[str], rank: int, alpha: float) -> list[str]:
    """Replace every ``nn.Linear`` whose attribute name is in ``targets`` (e.g. ``q_proj``) by a
    LoRALinear; returns the names of the wrapped modules (ValueError when none matches)."""
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"lora_targets={targets} match no nn.Linear of the model: use names such as q_proj, o_proj")
    return wrapped


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRALinear into its weight and restore plain ``nn.Linear``; returns how many."""
    merged = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.weight.add_(child.delta().to(child.weight.dtype))
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                plain.weight, plain.bias = child.weight, child.bias
                setattr(module, child_name, plain)
                merged += 1
    return merged


def merge_lora_state(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The same merge on a state dict (``X.weight``, ``X.lora_A``, ``X.lora_B`` -> ``X.weight``)."""
    out = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
    for key in state:
        if key.endswith(".lora_A"):
            prefix = key[: -len(".lora_A")]
            w = out[prefix + ".weight"]
            out[prefix + ".weight"] = w + (scale * state[prefix + ".lora_B"] @ state[key]).to(w.dtype)
    return out
