"""The Accelerate engine: ``accelerate launch -m trainer.train trainer.engine.name=accelerate``.

Accelerate's distributed type and plugins come from its launcher (``accelerate launch
--config_file launch/accelerate/*.yaml``); under torchrun it is DDP. Accelerate averages
gradients over the whole world (every dp x cp rank), as the loss scaling of
trainer.batching.batch_loss requires; gradient accumulation stays ours (``backward`` divides,
``no_sync`` skips the reduction), so it is the same arithmetic as the native engine. Checkpoints
are Accelerate's own ``save_state`` / ``load_state``.

On CPU Accelerate silently replaces its FSDP and DeepSpeed plugins by DDP: a launcher config
asking for them on CPU is refused with a message instead (use trainer.engine.name=deepspeed).
"""

from __future__ import annotations

import os

import torch

from trainer.engines import Engine, register_engine, require
from trainer.optim import build_optimizer

STATE = "accelerate"  # the engine's sub-directory inside a longctx checkpoint directory


def _on_cpu(cfg) -> bool:
    return cfg.trainer.device == "cpu" or (cfg.trainer.device == "auto" and not torch.cuda.is_available())


def check(cfg) -> None:
    require("accelerate", "accelerate", "trainer.engine.name=accelerate")
    if _on_cpu(cfg):
        for env, plugin in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
            if os.environ.get(env, "false").lower() in ("1", "true"):
                raise ValueError(
                    f"the accelerate launch config asks for its {plugin} plugin, which Accelerate replaces "
                    f"by DDP on CPU: launch with launch/accelerate/cpu.yaml, or use trainer.engine.name="
                    f"{'deepspeed' if plugin == 'DeepSpeed' else 'native parallel.dp_mode=fsdp'}"
                )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true") and cfg.trainer.grad_accum > 1:
        raise ValueError(
            f"trainer.grad_accum={cfg.trainer.grad_accum} with Accelerate's DeepSpeed plugin (which steps at every "
            "backward): set trainer.grad_accum=1 and raise data.micro_batch, or use trainer.engine.name=deepspeed"
        )


@register_engine("accelerate")
class AccelerateEngine(Engine):
    shards_with = "Accelerate's FSDP plugin"

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        check(cfg)

    def __init__(self, cfg, model, mesh):
        super().__init__(cfg.trainer.grad_accum)
        from accelerate import Accelerator

        # our process group is already up (parallel.mesh.init_mesh): Accelerate adopts it. On CPU
        # without OMP_NUM_THREADS it sets torch's threads to the host's physical cores / local
        # ranks, which can oversubscribe a container limited to fewer cores: keep the launcher's
        # (or parallel.spawn's) choice, as the native engine does
        threads = torch.get_num_threads()
        self.accelerator = Accelerator(cpu=_on_cpu(cfg), mixed_precision="no", gradient_accumulation_steps=1)
        torch.set_num_threads(threads)
        optimizer = build_optimizer(model, cfg.optim)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.module = self.accelerator.unwrap_model(self.model)
        self._torch_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)

    def no_sync(self, active):
        from contextlib import nullcontext

        return self.accelerator.no_sync(self.model) if active else nullcontext()

    def backward(self, loss, last):
        self.accelerator.backward(loss / self.grad_accum)

    def clip_grad_norm(self, max_norm):
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        return None if norm is None else float(norm)  # None: the DeepSpeed plugin clips in its step

    def grad_norm(self):
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        norm = wrapped.engine.get_global_grad_norm() if wrapped is not None else None
        return float("nan") if norm is None else float(norm)

    def step(self):
        self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, path):
        self.accelerator.save_state(os.path.join(path, STATE))

    def load(self, path):
        self.accelerator.load_state(os.path.join(path, STATE))
