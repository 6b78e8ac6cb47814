"""The DeepSpeed engine: ZeRO stages 0-3 from ``trainer.engine.deepspeed`` (DeepSpeed's JSON
config as a Hydra node), DeepSpeed's own checkpoints, and no surprise C++ builds.

DeepSpeed reduces gradients over its data-parallel group, which is the whole world here (no
``mpu``): every dp x cp rank, as the loss scaling of trainer.batching.batch_loss requires.
``backward`` divides by ``gradient_accumulation_steps`` itself. The optimizer is the torch
AdamW of optim.* (ZeRO partitions its state); the LR schedule of optim.* drives its groups.

JIT builds: DeepSpeed compiles C++ ops on first use (its shared-memory comm op as soon as the
CPU accelerator initialises communication, C++ Adam, optimizer offload), minutes each on CPU,
and a build killed half-way leaves a ``lock`` file that makes every later build wait forever.
Unless ``trainer.engine.build_ops=true``, the comm op is skipped (torch.distributed serves every
collective) and any other build stops with a message; with it, a stale lock is reported first.
"""

from __future__ import annotations

import copy
import glob
import os

import torch

from trainer.engines import Engine, register_engine, require
from trainer.optim import build_optimizer

TAG = "deepspeed"  # the engine's sub-directory inside a longctx checkpoint directory
CPP_OPTIMIZERS = ("adam", "adamw", "cpuadam", "deepspeedcpuadam", "lamb", "onebitadam", "adagrad", "lion")


def ds_config(cfg) -> dict:
    """``trainer.engine.deepspeed`` with every "auto" filled from the rest of the config;
    ValueError when an explicit value disagrees with the setting it shadows."""
    t, o = cfg.trainer, cfg.optim
    conf = copy.deepcopy(dict(t.engine.deepspeed))
    shadows = {
        ("train_micro_batch_size_per_gpu",): (cfg.data.micro_batch, "data.micro_batch"),
        ("gradient_accumulation_steps",): (t.grad_accum, "trainer.grad_accum"),
        ("gradient_clipping",): (float(o.grad_clip), "optim.grad_clip"),
        ("bf16", "enabled"): (t.precision == "bf16", "trainer.precision"),
    }
    for keys, (value, setting) in shadows.items():
        node = conf
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        have = node.get(keys[-1], "auto")
        if have == "auto":
            node[keys[-1]] = value
        elif have != value:
            raise ValueError(
                f"trainer.engine.deepspeed.{'.'.join(keys)}={have!r} disagrees with {setting} ({value!r}): "
                f"set it to auto and choose {setting}"
            )
    return conf


def check(cfg) -> None:
    """Everything local, before any collective: the package, settings DeepSpeed cannot honour
    here, and ops that would need a C++ build."""
    require("deepspeed", "deepspeed", "trainer.engine.name=deepspeed")
    e, t = cfg.trainer.engine, cfg.trainer
    conf = ds_config(cfg)
    if t.nonfinite != "stop":
        raise ValueError(
            "trainer.nonfinite=skip is not supported with trainer.engine.name=deepspeed (its step "
            "clips and updates at once): set trainer.nonfinite=stop"
        )
    stage = conf.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"trainer.engine.deepspeed.zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    if "scheduler" in conf:
        raise ValueError("trainer.engine.deepspeed.scheduler is not used: optim.* sets the LR schedule; remove it")
    if conf.get("fp16", {}).get("enabled", False):
        raise ValueError("trainer.engine.deepspeed.fp16.enabled=true is not supported: use trainer.precision=bf16")
    if e.build_ops:
        stale_locks()  # raises naming the file
        return
    hint = "or set trainer.engine.build_ops=true to compile it (minutes on first use)"
    opt = conf.get("optimizer")
    if opt is not None:
        kind = str(opt.get("type", "")).lower()
        if kind in ("adam", "adamw") and opt.get("params", {}).get("torch_adam", False):
            pass
        elif kind in CPP_OPTIMIZERS:
            raise ValueError(
                f"trainer.engine.deepspeed.optimizer.type={opt.get('type')} needs a C++ op built on first "
                f"use: remove the optimizer section (optim.* builds a torch AdamW) or set "
                f"trainer.engine.deepspeed.optimizer.params.torch_adam=true, {hint}"
            )
    for key in ("offload_optimizer", "offload_param"):
        device = (conf.get("zero_optimization", {}).get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ValueError(
                f"trainer.engine.deepspeed.zero_optimization.{key}.device={device} needs DeepSpeed's C++ CPU "
                f"Adam: set it to none, {hint}"
            )


def _build_root() -> str:
    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def stale_locks() -> None:
    """ValueError naming a ``lock`` file left in the extensions cache by an interrupted build
    (torch waits on it forever). Called before this job builds anything, so any lock found is
    another job's build or a stale one."""
    root = _build_root()
    locks = sorted(glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock")))
    if locks:
        raise ValueError(
            f"{locks[0]} exists: a C++ extension build was interrupted (or another job is building right "
            f"now), and the next build would wait on it forever; if no build is running, remove it "
            f"(rm {locks[0]}) and start again"
        )


_GUARDED = [False]


def guard_jit_builds(allow: bool) -> None:
    """Skip DeepSpeed's shared-memory comm op and refuse every other JIT build (allow=False),
    or announce each build (allow=True). Idempotent; lasts for the process."""
    if _GUARDED[0]:
        return
    _GUARDED[0] = True
    import importlib

    from deepspeed.ops.op_builder.builder import OpBuilder

    ds_comm = importlib.import_module("deepspeed.comm.torch")  # not `import ... as`: deepspeed.comm.torch is also torch

    real = OpBuilder.jit_load

    def jit_load(self, verbose=True):
        if not allow:
            raise ValueError(
                f"DeepSpeed wanted to compile its C++ op {self.name} (minutes on CPU): choose settings "
                f"that need no C++ op, or set trainer.engine.build_ops=true"
            )
        stale_locks()
        print(f"[longctx] DeepSpeed is compiling its C++ op {self.name} (minutes, once; cached in {_build_root()})")
        return real(self, verbose)

    OpBuilder.jit_load = jit_load
    if not allow and hasattr(ds_comm, "build_shm_op"):
        ds_comm.build_shm_op = lambda: None  # torch.distributed serves every collective


@register_engine("deepspeed")
class DeepSpeedEngine(Engine):
    shards_with = "trainer.engine.deepspeed.zero_optimization.stage=3"
    settings = ("deepspeed", "build_ops")

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        check(cfg)

    def __init__(self, cfg, model, mesh):
        super().__init__(cfg.trainer.grad_accum)
        conf = ds_config(cfg)
        guard_jit_builds(cfg.trainer.engine.build_ops)
        import deepspeed

        optimizer = None if "optimizer" in conf else build_optimizer(model, cfg.optim)
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=conf)
        self.model, self.module = engine, engine.module
        self.optimizer = getattr(opt, "optimizer", opt)  # the torch optimizer ZeRO wraps
        # ZeRO-0 in fp32 keeps whole, reduced gradients: measure the norm before the step like
        # the native engine (DeepSpeed clips those with torch too, without reporting the norm)
        self._plain_grads = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()

    def backward(self, loss, last):
        self.model.backward(loss)  # scaled by 1 / gradient_accumulation_steps
        if not last:
            self.model.step()  # a micro-step: DeepSpeed counts it, updates nothing

    def clip_grad_norm(self, max_norm):
        if self._plain_grads:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            return float(torch.nn.utils.get_total_norm(grads))
        return None  # ZeRO holds partitioned gradients: the engine clips inside step()

    def step(self):
        self.model.step()  # clips (gradient_clipping) and updates at the accumulation boundary

    def grad_norm(self):
        norm = self.model.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def zero_grad(self):
        self.model.zero_grad()

    def save(self, path):
        self.model.save_checkpoint(path, tag=TAG, save_latest=False)

    def load(self, path):
        done, _ = self.model.load_checkpoint(path, tag=TAG, load_lr_scheduler_states=False)
        if done is None:
            raise ValueError(f"{path}/{TAG} holds no DeepSpeed checkpoint: was it written by another engine?")


def consolidated_state_dict(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """Whole fp32 parameters by name from a longctx checkpoint written by the DeepSpeed engine
    (any ZeRO stage; no process group needed), e.g. for models.hf_io.save_hf_checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=TAG)
