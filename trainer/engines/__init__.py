"""Training engines: one small adapter per engine, one training step in trainer/train.py.

    engine = build_engine(cfg, model, mesh)    # wraps the model, builds the optimizer
    out = engine.model(input_ids, positions, ctx)
    engine.backward(loss, last)                # last: the final micro-batch of the step
    norm = engine.clip_grad_norm(max_norm)     # None: the engine clips inside step()
    engine.step(); engine.zero_grad()
    engine.save(path) / engine.load(path)      # model + optimizer, collective

Engines (``trainer.engine.name``, or the group ``engine=NAME``): ``native`` (DDP or FSDP2 per
``parallel.dp_mode``), ``deepspeed`` (ZeRO 0-3), ``accelerate``. A new engine is one file whose
``Engine`` subclass is decorated ``@register_engine("name")`` (with its local checks in the
classmethod ``check(cfg)``), plus its import line at the bottom of this file. Context parallelism lives in
the model's context object, so an engine only decides how gradients are reduced -- always over
the whole dp x cp world -- and how state is saved. Loss convention, the same for every engine:
``backward`` gets each micro-batch's loss scaled by ``world_size / global token count``
(trainer.batching.batch_loss); the engine divides it by ``trainer.grad_accum`` and averages
gradients over all ranks, which is the exact gradient of the global mean loss.
"""

from __future__ import annotations

import contextlib

import torch

ENGINES: dict[str, type] = {}  # trainer.engine.name -> Engine subclass


def register_engine(name: str):
    def wrap(cls):
        cls.name = name
        ENGINES[name] = cls
        return cls

    return wrap


class Engine:
    """The interface; ``model`` is what forward and evaluation call, ``module`` the plain model,
    ``optimizer`` the torch optimizer the LR schedule drives."""

    name = "engine"
    # how this engine shards model and optimizer state (named when parallel.dp_mode asks for the
    # native engine's FSDP); None: the engine honours parallel.dp_mode itself
    shards_with: str | None = "its own ZeRO settings"
    settings: tuple[str, ...] = ()  # the trainer.engine.* fields (EngineConfig) this engine reads
    model: torch.nn.Module
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(self, grad_accum: int):
        self.grad_accum = grad_accum

    @classmethod
    def check(cls, cfg) -> None:
        """Local checks of the engine's settings (before any collective); ValueError naming the
        setting. Subclasses extend it."""
        engine, defaults = cfg.trainer.engine, type(cfg.trainer.engine)()
        for key in vars(defaults):  # another engine's setting, changed, would be silently ignored
            if key != "name" and key not in cls.settings and getattr(engine, key) != getattr(defaults, key):
                owners = [n for n, e in ENGINES.items() if key in e.settings]
                raise ValueError(
                    f"trainer.engine.{key} is a setting of the {' / '.join(owners)} engine, which "
                    f"trainer.engine.name={cls.name} ignores: remove it, or set trainer.engine.name={owners[0]}"
                )
        if cls.shards_with is not None and cfg.parallel.dp_mode != "ddp":
            raise ValueError(
                f"parallel.dp_mode={cfg.parallel.dp_mode!r} belongs to the native engine: with "
                f"trainer.engine.name={cls.name} leave it at ddp and shard with {cls.shards_with}"
            )

    def no_sync(self, active: bool):
        """Skip gradient reduction for this micro-batch (all but the last of a step)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        raise NotImplementedError

    def clip_grad_norm(self, max_norm: float) -> float | None:
        """Clip and return the global gradient norm before clipping; None when the engine clips
        inside step() (then ``grad_norm()`` reports it after the step)."""
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def grad_norm(self) -> float:
        return float("nan")

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, path: str) -> None:
        """Collective: write model + optimizer state into the directory ``path``."""
        raise NotImplementedError

    def load(self, path: str) -> None:
        raise NotImplementedError


def engine_class(name: str) -> type:
    if name not in ENGINES:
        raise ValueError(f"trainer.engine.name={name!r} is unknown: choose one of {tuple(ENGINES)}")
    return ENGINES[name]


def build_engine(cfg, model: torch.nn.Module, mesh) -> Engine:
    """The engine ``trainer.engine.name`` wrapping ``model`` (and building its optimizer)."""
    return engine_class(cfg.trainer.engine.name)(cfg, model, mesh)


def check_engine(cfg) -> None:
    """Local checks of the engine settings (before any collective); ValueError naming the setting."""
    engine_class(cfg.trainer.engine.name).check(cfg)


def require(module: str, extra: str, setting: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ValueError(f"{setting} needs the {module} package: pip install -e '.[{extra}]', or choose another engine")


from trainer.engines import accelerate, deepspeed, native  # noqa: E402, F401  (registration)
