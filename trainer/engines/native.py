"""The native engine: DDP or FSDP2 (parallel.dp_mode) over the dp x cp world, torch AdamW,
DCP checkpoints of model and optimizer."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from parallel.data_parallel import no_sync, unwrap, wrap_data_parallel
from trainer.engines import Engine, register_engine
from trainer.optim import build_optimizer


@register_engine("native")
class NativeEngine(Engine):
    shards_with = None  # DDP or FSDP2, per parallel.dp_mode

    def __init__(self, cfg, model, mesh):
        super().__init__(cfg.trainer.grad_accum)
        self.model = wrap_data_parallel(model, cfg.parallel.dp_mode, mesh)
        self.module = unwrap(self.model)
        self.optimizer = build_optimizer(self.model, cfg.optim)

    def no_sync(self, active):
        return no_sync(self.model, active)

    def backward(self, loss, last):
        (loss / self.grad_accum).backward()

    def clip_grad_norm(self, max_norm):
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    def step(self):
        self.optimizer.step()

    def _state(self):
        return {
            "model": get_model_state_dict(self.module),
            "optim": get_optimizer_state_dict(self.module, self.optimizer),
        }

    def save(self, path):
        dcp.save(self._state(), checkpoint_id=path)  # collective; a failed write raises on every rank

    def load(self, path):
        state = self._state()
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(self.module, state["model"])
        set_optimizer_state_dict(self.module, self.optimizer, state["optim"])
