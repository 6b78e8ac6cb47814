"""Hydra entry point: ``python -m trainer.train [experiment=NAME] [key=value ...]``.

Order of work: validate the config on every rank (no collective yet), build the dp x cp
mesh, the model (optionally from a Hugging Face checkpoint), data parallelism, optimizer,
data; resume from the run directory if it holds a checkpoint; train with gradient
accumulation, clipping and autocast; log, evaluate, checkpoint (also on SIGTERM/SIGUSR1).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from models import Transformer
from models.lora import attach_lora, merge_lora_state
from parallel.data_parallel import full_state_dict
from parallel.mesh import Mesh, env_ranks, init_mesh
from trainer import checkpoint, init_from, run_checks, stages
from trainer.batching import build_loaders, data_metrics, prepare_batch
from trainer.config import TrainConfig, conf_dir, cp_strategies, register_schema, reject_unknown_keys, validate
from trainer.engines import Engine, build_engine
from trainer.eval_report import write_report
from trainer.evaluate import evaluate
from trainer.metrics import MetricsLogger, device_peak_flops, matmul_params, rank_batch_flops
from trainer.objectives import Objective, build_objective, objective_class
from trainer.optim import build_scheduler
from trainer.parallelize import apply_activation_checkpointing, apply_loss_head

FP32_ON_GPU_WARNING = (
    "[longctx] warning: training on GPU in fp32 (trainer.precision=fp32, the default): attention runs "
    "in PyTorch's fp32 kernels, never flash-attn, and matmuls at the fp32 peak; set trainer.precision=bf16"
)


def to_config(cfg: DictConfig) -> TrainConfig:
    """Merge onto the typed schema and instantiate; an unknown key or a wrong type raises a
    one-line ValueError naming the setting."""
    reject_unknown_keys(cfg, TrainConfig, "")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        return OmegaConf.to_object(merged)
    except ValidationError as e:
        raise ValueError(f"{e.full_key}: {str(e.msg).splitlines()[0]}: fix the value") from None


class _Preemption:
    """Remembers SIGTERM / SIGUSR1; the trainer checkpoints and exits at the next step."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.flag = True


def _resolve_run_dir(cfg: TrainConfig, mesh: Mesh) -> str:
    if cfg.trainer.run_dir is not None:
        run_dir = cfg.trainer.run_dir
        run_checks.check_run_dir(run_dir)  # every rank, before the collective below
    else:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "runs/default"
    box = [run_dir]
    dist.broadcast_object_list(box, src=0)  # every rank agrees with rank 0's directory
    os.makedirs(box[0], exist_ok=True)
    return box[0]


def build_model(cfg: TrainConfig, device: torch.device, expand_kv: bool = True) -> Transformer:
    """The first stage's model: from a Hugging Face directory or a longctx run dir (``init_from``),
    or freshly initialised (seeded with trainer.seed). A Hugging Face directory defines the
    architecture, explicit settings on top (trainer/init_from.py); ``cfg.model`` becomes the model
    built, so checkpoints and exports record it."""
    torch.manual_seed(cfg.trainer.seed)
    if cfg.init_from is not None and init_from.is_run_dir(cfg.init_from):
        _, state = checkpoint.load_run_weights(cfg.init_from)  # another longctx run
        init_from.warn_mixer_pattern(cfg)
        model = Transformer(cfg.model)
        counts = stages.carry_weights(state, model, expand_kv, f"init_from={cfg.init_from}")
        if counts["copied"] + counts["expanded"] == 0:
            raise ValueError(f"init_from={cfg.init_from!r} shares no parameter with this model: check model.*")
    elif cfg.init_from is not None:
        from models.hf_io import load_hf_checkpoint

        cfg.model = init_from.resolve(cfg, log=False).model  # as stages.plan resolved it
        try:
            _, state = load_hf_checkpoint(cfg.init_from)
        except ValueError as e:
            raise ValueError(f"init_from={cfg.init_from!r}: {e}, or set init_from=null to train from scratch") from None
        model = Transformer(cfg.model)
        if all(block.mixer.hf_attention for block in model.layers.values()):
            model.load_state_dict(state, strict=True)
        else:  # converting (e.g. recipe=linearize): carried as between stages
            stages.carry_weights(state, model, expand_kv, f"init_from={cfg.init_from}")
    else:
        model = Transformer(cfg.model)
    return _with_trainer_settings(model, cfg).to(device)


def _with_trainer_settings(model: Transformer, cfg: TrainConfig) -> Transformer:
    """What the trainer applies to every model it builds, from outside (trainer/parallelize.py):
    the loss head of trainer.loss_chunk_tokens, activation checkpointing if asked for."""
    apply_loss_head(model, cfg.trainer.loss_chunk_tokens)
    if cfg.trainer.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model


def _stage_model(st: stages.Stage, device: torch.device, prev: dict | None) -> Transformer:
    """The stage's model: the previous stage's weights carried over (trainer/stages.py), LoRA
    attached, parameters outside ``train_params`` frozen."""
    cfg, spec = st.cfg, st.spec
    if prev is None:
        model = build_model(cfg, device, spec.expand_kv)
    else:
        torch.manual_seed(cfg.trainer.seed + st.index)  # new parameters: the same on every rank
        model = Transformer(cfg.model)
        stages.carry_weights(prev["weights"], model, spec.expand_kv)
        model = _with_trainer_settings(model, cfg).to(device)
    if spec.lora_rank > 0:
        attach_lora(model, list(spec.lora_targets), spec.lora_rank, spec.lora_alpha)
    stages.freeze(model, list(spec.train_params), f"recipe.stages[{st.index}] ({spec.name})")
    return model


def _stage_mesh(st: stages.Stage, mesh: Mesh | None) -> tuple[Mesh, dict]:
    """(mesh, {mixer kind: strategy}) for a stage; a new mesh only when the CP size (or a
    strategy's sub-groups) change between stages. The stage's objective may run more kinds
    (attention transfer runs softmax)."""
    cfg = st.cfg
    strategies = cp_strategies(cfg, objective_class(st.spec.objective).extra_kinds)
    sizes = [u for s in strategies.values() for u in s.subgroup_sizes(cfg.parallel.cp.size, cfg.model.n_heads)]
    if mesh is not None and mesh.cp == cfg.parallel.cp.size and set(sizes) <= set(mesh.subgroups):
        return mesh, strategies
    return init_mesh(cfg.parallel.cp.size, cfg.trainer.device, sizes), strategies


def train(cfg: TrainConfig) -> dict:
    preempt = _Preemption()  # first: a signal must never kill us
    started = time.perf_counter()
    rank, _, world = env_ranks()
    chosen = _resolve_auto(cfg, world)  # parallel.cp.strategies.<kind>=auto, before validation
    if cfg.init_from is None:  # else the checkpoint's architecture is resolved by stages.plan first
        validate(cfg, world)  # before any collective can hang
    plan = stages.plan(cfg)  # every stage's settings, checked too
    for st in plan:
        validate(st.cfg, world)
    mesh, _ = _stage_mesh(plan[0], None)
    run_dir = _resolve_run_dir(cfg, mesh)
    resume, skipped = checkpoint.find_resume(run_dir, rank, world)  # newest *complete* checkpoint
    if mesh.is_main:
        for line in skipped:
            print(f"[longctx] {line}", flush=True)
    first = checkpoint.read_meta(run_dir, resume).get("stage", 0) if resume is not None else 0
    if resume is not None:  # a changed architecture stops here, other changed settings are listed
        for line in checkpoint.check_resume(run_dir, resume, plan[first].cfg):
            if mesh.is_main:
                print(f"[longctx] {line}", flush=True)
    logger = MetricsLogger(
        run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)), mesh.is_main, cfg.logger, resumed_from=resume
    )
    run = _Run(run_dir, logger, preempt, step=resume or 0, history=[])
    for kind, c in chosen.items():
        run.predicted_step_s = c["step_s"]  # the last choice's prediction includes the earlier ones
        if mesh.is_main:
            print(
                f"[longctx] parallel.cp.strategies.{kind}=auto chose {c['strategy']} (cost model, {c['cluster']} "
                f"profile): predicted step {c['step_s']:.3g} s, {c['tokens_per_s']:.3g} tokens/s, MFU {c['mfu']:.2f}, "
                f"{c['memory_gib']:.2f} GiB per device; considered {c['considered']}",
                flush=True,
            )
    stop_after = cfg.trainer.stop_after
    run.end = plan[-1].end if stop_after is None else min(plan[-1].end, run.step + stop_after)
    run.pinned = {plan[i].end for i in stages.branch_points(plan)}
    finished, last = {}, {}  # stage index -> its final weights, while a later stage starts from them
    for st in plan[first:]:
        if st.index > first and run.step >= run.end:  # stopped at a stage boundary (stop_after)
            break
        mesh, strategies = _stage_mesh(st, mesh)
        prev = None if st.index == first else _start_weights(run, plan[st.source], finished)
        done, last = _run_stage(run, st, mesh, strategies, prev, resume if st.index == first else None)
        if done is None or run.stopped:  # stopped inside the stage (stop_after) or by a signal
            break
        finished[st.index] = done
        later = {s.source for s in plan[st.index + 1 :]}
        finished = {  # beyond the next stage only the weights (start_from resets the optimizer)
            i: w if i == st.index else {**w, "model": None, "optimizer": None}
            for i, w in finished.items()
            if i in later
        }
    logger.close()
    out = {"step": run.step, "history": run.history, "run_dir": run_dir, **last}
    if mesh.is_main:
        took = time.perf_counter() - started
        print(run_checks.summary_line(out, took, run_dir, checkpoint.newest_saved(run_dir)), flush=True)
    return out


def _start_weights(run: _Run, source: stages.Stage, finished: dict) -> dict:
    """The final weights of stage ``source`` for a stage that starts from them: kept in memory, or
    (a resumed run past it, ``start_from``) read from the checkpoint of its end, which is pinned."""
    if source.index in finished:
        return finished[source.index]
    ckpt = os.path.join(run.run_dir, "checkpoints", f"step_{source.end:06d}")
    if not os.path.isdir(ckpt):
        raise ValueError(
            f"the weights of stage {source.spec.name!r} (step {source.end}) are not in {ckpt}: a resumed run "
            "needs the checkpoint of the end of a stage that a later stage's start_from names; rerun from it"
        )
    return {"weights": checkpoint.checkpoint_weights(ckpt)[1], "model": None, "optimizer": None}


def _resolve_auto(cfg: TrainConfig, world: int) -> dict:
    """Each ``parallel.cp.strategies.<kind>=auto`` replaced by the cost model's choice for this
    run's shape on this machine's cluster profile (parallel/auto.py); {} when none is auto."""
    if "auto" not in dict(cfg.parallel.cp.strategies).values():
        return {}
    from parallel.auto import cluster_for_device, resolve_auto

    gpu = cfg.trainer.device != "cpu" and torch.cuda.is_available()
    return resolve_auto(cfg, world, cluster_for_device(conf_dir(), torch.cuda.get_device_name() if gpu else None))


@dataclasses.dataclass
class _Run:
    """What the stages of one run share."""

    run_dir: str
    logger: MetricsLogger
    preempt: _Preemption
    step: int  # global step (continues across stages)
    history: list
    end: int = 0  # the global step this invocation stops at
    stopped: bool = False  # a preemption signal (agreed by every rank) stopped the run
    predicted_step_s: float | None = None  # the cost model's step time (strategies=auto), checked once
    pinned: set = dataclasses.field(default_factory=set)  # steps always checkpointed and never pruned


@dataclasses.dataclass
class _StageRun:
    """One stage in progress: what its set-up built and the counters its steps update."""

    st: stages.Stage
    mesh: Mesh
    strategies: dict
    engine: Engine
    objective: Objective
    scheduler: object
    loaders: tuple  # (train, val, tokenizer)
    n_matmul: int
    peak: float | None  # per-device peak FLOP/s (MFU); None: unknown
    autocast: object
    end: int  # the global step this stage stops at in this invocation
    tag: dict  # {"stage": name} in a recipe, else empty
    console: object
    bar: object = None
    train_iter: object = None
    last: dict = dataclasses.field(default_factory=dict)  # the last logged metrics
    window: list = dataclasses.field(default_factory=list)  # step losses since the last log
    skips: int = 0  # non-finite steps skipped
    t0: float = 0.0
    steps_since: int = 0
    tokens_since: int = 0
    flops_since: float = 0.0


def _run_stage(run: _Run, st: stages.Stage, mesh: Mesh, strategies: dict, prev: dict | None, resume: int | None):
    """Train one stage from ``run.step`` to its end (or ``run.end``). Returns (the finished
    stage's weights and optimizer for the next stage, or None when stopped early; the last
    metrics)."""
    sr = _set_up_stage(run, st, mesh, strategies, prev, resume)
    if resume is None and (st.index == 0 or st.staged):  # the starting point of the stage
        _evaluate(run, sr, at="start")
    sr.t0 = time.perf_counter()
    while run.step < sr.end:
        train_loss, grad_norm, bad, stop = _train_step(run, sr)
        _log_step(run, sr, train_loss, grad_norm, bad)
        _evaluate_and_save(run, sr, stop)
        if stop:
            run.stopped = True
            if mesh.is_main:
                print(f"[longctx] preempted: checkpoint written at step {run.step}")
            break
    if sr.bar is not None:
        sr.bar.close()
    if run.step < st.end:
        return None, sr.last
    weights = full_state_dict(sr.engine.module)  # collective under FSDP
    if st.spec.lora_rank > 0:
        weights = merge_lora_state(weights, st.spec.lora_alpha / st.spec.lora_rank)
    return {"weights": weights, "model": sr.engine.module, "optimizer": sr.engine.optimizer}, sr.last


def _set_up_stage(run: _Run, st: stages.Stage, mesh: Mesh, strategies: dict, prev, resume) -> _StageRun:
    """Data, model, engine, objective, schedule; the resumed (or seeded) state; the banner."""
    cfg, t, spec, rank = st.cfg, st.cfg.trainer, st.spec, mesh.rank
    train_loader, val_loader, tokenizer = build_loaders(cfg, mesh)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size}): set model.vocab_size={tokenizer.vocab_size}"
        )
    model = _stage_model(st, mesh.device, None if resume is not None else prev)
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = matmul_params(model)  # before the engine wraps (or shards) it
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine = build_engine(cfg, model, mesh)  # native (DDP / FSDP2), deepspeed or accelerate
    if spec.optimizer == "keep" and prev is not None and prev["optimizer"] is not None and resume is None:
        stages.carry_optimizer_state(prev["optimizer"], prev["model"], engine.optimizer, engine.module)
    scheduler = build_scheduler(engine.optimizer, spec.steps, cfg.optim)
    if resume is not None:
        run.step = checkpoint.load(run.run_dir, resume, engine, scheduler, train_loader, rank)
    else:
        torch.manual_seed(t.seed + rank + 1000 * st.index)
    if mesh.is_main:
        tokens_per_step = cfg.data.seq_len * cfg.data.micro_batch * t.grad_accum * mesh.dp
        print(
            f"[longctx] run_dir={run.run_dir} "
            + (f"stage {st.index + 1}/{st.count} {spec.name} ({spec.objective}) " if st.staged else "")
            + f"world={mesh.world_size} dp={mesh.dp} cp={mesh.cp} "
            f"strategies={','.join(f'{k}:{s.name}' for k, s in strategies.items())} "
            f"layout={cfg.parallel.cp.layout} "
            f"params={n_params / 1e6:.2f}M"
            + (f" (training {n_train / 1e6:.3f}M)" if n_train != n_params else "")
            + f" tokens/step={tokens_per_step}"
            + (f" resumed from step {run.step}" if resume else "")
        )
        if mesh.device.type == "cuda" and t.precision == "fp32":
            print(FP32_ON_GPU_WARNING)
    sr = _StageRun(
        st=st,
        mesh=mesh,
        strategies=strategies,
        engine=engine,
        objective=build_objective(cfg, model, mesh, spec.objective),
        scheduler=scheduler,
        loaders=(train_loader, val_loader, tokenizer),
        n_matmul=n_matmul,
        peak=device_peak_flops(mesh.device, t.peak_tflops, t.precision),
        autocast=torch.autocast(mesh.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"),
        end=min(st.end, run.end),
        tag={"stage": spec.name} if st.staged else {},
        console=print,
    )
    sr.train_iter = iter(train_loader)
    sr.bar = _progress(t, run.step - st.offset, mesh)
    sr.console = sr.bar.write if sr.bar is not None else print
    return sr


def _train_step(run: _Run, sr: _StageRun) -> tuple[float, float, bool, bool]:
    """One optimizer step over trainer.grad_accum micro-batches: the objective's loss, backward,
    clipping, the step (skipped when non-finite on any rank). Returns (train value, grad norm,
    skipped, stop requested by a signal)."""
    cfg, t, mesh, engine = sr.st.cfg, sr.st.cfg.trainer, sr.mesh, sr.engine
    engine.model.train()
    loss_sum, count_sum = 0.0, 0
    for micro in range(t.grad_accum):
        batch, ctx = prepare_batch(next(sr.train_iter), cfg, mesh, sr.strategies)
        last_micro = micro == t.grad_accum - 1
        with engine.no_sync(not last_micro), sr.autocast:
            loss, value_sum, count = sr.objective.loss(engine.model, batch, ctx)
            engine.backward(loss, last_micro)  # divides by grad_accum
        loss_sum += value_sum
        count_sum += count
        sr.tokens_since += batch["input_ids"].numel()
        sr.flops_since += rank_batch_flops(cfg.model, sr.n_matmul, batch, mesh.cp)  # from its documents
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")  # 0: off
    grad_norm = engine.clip_grad_norm(max_norm)  # None: DeepSpeed clips inside step()
    train_loss = loss_sum / max(count_sum, 1)
    # one all-reduce per step: a non-finite loss or grad norm on any rank, a preemption signal
    finite = math.isfinite(train_loss) and (grad_norm is None or math.isfinite(grad_norm))
    bad, stop = _any_rank((not finite, run.preempt.flag), mesh)
    step = run.step + 1
    if bad:
        sr.skips += 1
        norm = float("nan") if grad_norm is None else grad_norm
        _check_nonfinite(t, step, sr.skips, train_loss, norm, run.run_dir)
    else:  # skip: drop the update, keep the data order
        engine.step()
    if grad_norm is None:  # reported after the step: stop before anything is saved
        grad_norm = engine.grad_norm()
        if not bad and not math.isfinite(grad_norm):
            _check_nonfinite(t, step, sr.skips + 1, train_loss, grad_norm, run.run_dir)
    sr.scheduler.step()
    engine.zero_grad()
    run.step = step
    run.history.append(train_loss)
    return train_loss, grad_norm, bad, stop


def _log_step(run: _Run, sr: _StageRun, train_loss: float, grad_norm: float, bad: bool) -> None:
    """The progress bar every step; every trainer.log_every steps (and at the stage's end) the
    means since the last log, throughput and MFU into metrics.jsonl."""
    t, mesh, step = sr.st.cfg.trainer, sr.mesh, run.step
    if not bad:
        sr.window.append(train_loss)
    sr.steps_since += 1
    if sr.bar is not None:
        sr.bar.update(1)
        sr.bar.set_postfix(loss=f"{train_loss:.4f}")
    if not (step % t.log_every == 0 or step == sr.end):
        return
    dt = time.perf_counter() - sr.t0
    if run.predicted_step_s and step - sr.st.offset > t.log_every:  # after the first window (warm-up)
        from parallel.auto import check_prediction

        warning = check_prediction(run.predicted_step_s, dt / max(sr.steps_since, 1))
        run.predicted_step_s = None  # once
        if warning and mesh.is_main:
            sr.console(f"[longctx] warning: {warning}")
    # every rank holds distinct tokens (its CP shard of its dp rows): world x local tokens
    tok_s = sr.tokens_since * mesh.world_size / max(dt, 1e-9)
    sr.last = {
        **sr.tag,
        sr.objective.metric: sum(sr.window) / len(sr.window) if sr.window else float("nan"),
        "lr": sr.scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm),
        "tokens_per_s": tok_s,
    }  # the objective's value: mean since last log
    sr.last.update(data_metrics(sr.loaders[0]))  # prepared data: realised share per source
    if sr.skips:
        sr.last["skipped_steps"] = sr.skips
    sr.window = []
    if sr.peak:  # every rank's rows differ in their documents: sum the FLOPs over the world
        flops = _sum_ranks(sr.flops_since, mesh)
        sr.last["tflops_per_device"] = flops / max(dt, 1e-9) / mesh.world_size / 1e12
        sr.last["mfu"] = flops / (max(dt, 1e-9) * sr.peak * mesh.world_size)
    if mesh.device.type == "cuda":
        sr.last["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    run.logger.log(step, sr.last, console=sr.console)
    sr.t0, sr.steps_since, sr.tokens_since, sr.flops_since = time.perf_counter(), 0, 0, 0.0


def _evaluate(run: _Run, sr: _StageRun, at: str | None) -> dict:
    """Held-out evaluation logged at ``run.step``; ``at`` ("start" / "end") marks a recipe stage's
    boundaries, whose evaluations also go into the run's eval report."""
    st, mesh = sr.st, sr.mesh
    _, val_loader, tokenizer = sr.loaders
    ev = evaluate(sr.engine.model, val_loader, tokenizer, st.cfg, mesh, sr.strategies)
    marked = {"at": at} if st.staged and at is not None else {}
    run.logger.log(run.step, {**sr.tag, **marked, **ev}, console=sr.console)
    if marked and mesh.is_main:
        name = st.spec.name if at == "end" else f"{st.spec.name}_{at}"
        write_report(os.path.join(run.run_dir, "eval"), name, ev, **({"plots": False} if at == "start" else {}))
    return ev


def _evaluate_and_save(run: _Run, sr: _StageRun, stop: bool) -> None:
    """Evaluate every trainer.eval_every stage steps and at the stage's end; checkpoint every
    trainer.save_every steps, at the end of this invocation and when a signal stops the run."""
    st, t, step = sr.st, sr.st.cfg.trainer, run.step
    if (t.eval_every and (step - st.offset) % t.eval_every == 0) or step == st.end:
        sr.last.update(_evaluate(run, sr, "end" if step == st.end else None))
    if (t.save_every and step % t.save_every == 0) or step == sr.end or step in run.pinned or stop:
        meta = {
            "stage": st.index,
            "stage_name": st.spec.name,
            "stage_step": step - st.offset,
            "stage_spec": OmegaConf.to_container(OmegaConf.structured(st.spec)),
            "config": OmegaConf.to_container(OmegaConf.structured(st.cfg)),
        }
        train_loader = sr.loaders[0]
        rank, keep = sr.mesh.rank, t.keep_checkpoints
        checkpoint.save(run.run_dir, step, sr.engine, sr.scheduler, train_loader, rank, keep, meta, run.pinned)


def _any_rank(flags: tuple, mesh: Mesh) -> list[bool]:
    """Each flag OR-ed over all ranks, in one all-reduce."""
    x = torch.tensor([int(f) for f in flags], device=mesh.device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return [bool(v) for v in x.tolist()]


def _sum_ranks(value: float, mesh: Mesh) -> float:
    x = torch.tensor([value], dtype=torch.float64, device=mesh.device)
    dist.all_reduce(x)
    return float(x)


def _check_nonfinite(t, step: int, skips: int, loss: float, grad_norm: float, run_dir: str) -> None:
    """Raise (on every rank alike) unless trainer.nonfinite=skip has skips left."""
    if t.nonfinite == "skip" and skips <= t.max_skips:
        return
    done = checkpoint.newest_saved(run_dir)
    keep = f"the last good checkpoint is {done}" if done else "no checkpoint was written yet"
    why = (
        f"more than trainer.max_skips={t.max_skips} non-finite steps"
        if t.nonfinite == "skip"
        else "trainer.nonfinite=stop"
    )
    raise ValueError(
        f"non-finite loss ({loss:.4g}) or grad norm ({grad_norm:.4g}) at step {step}; "
        f"stopped ({why}) without updating, {keep}: lower optim.lr or check the data, "
        "or set trainer.nonfinite=skip"
    )


def _progress(t, step, mesh):
    # a bar only on a terminal: in a log file (SLURM, CI) it would be thousands of \r updates
    if not (mesh.is_main and t.progress_bar and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=t.steps, initial=step, desc="train", dynamic_ncols=True)


register_schema()


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    log = _run_log()
    try:
        train(to_config(cfg))
    except ValueError as e:  # configuration / checkpoint / divergence errors: one clear line
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if _lowest_failing_rank():
            print(f"[longctx] error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if log is not None:
            log.close()


def _run_log() -> run_checks.RunLog | None:
    """Rank 0 copies what it prints into the Hydra output dir's train.log (the run dir, see main)."""
    from hydra.core.hydra_config import HydraConfig

    if env_ranks()[0] != 0 or not HydraConfig.initialized() or HydraConfig.get().output_subdir is None:
        return None
    return run_checks.RunLog(os.path.join(HydraConfig.get().runtime.output_dir, "train.log"))


def _lowest_failing_rank() -> bool:
    """True on the lowest rank that failed (ranks failing together wait a moment to be seen).
    Before the process group exists every rank fails alike (validation), so rank 0 speaks."""
    rank = env_ranks()[0]
    if not dist.is_initialized():
        return rank == 0
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"longctx/failed/{rank}", "1")
        time.sleep(1.0)
        return not any(store.check([f"longctx/failed/{r}"]) for r in range(rank))
    except Exception:  # noqa: BLE001 -- the store is gone: speak rather than stay silent
        return True


def main() -> None:
    try:  # before Hydra: it would train the default for an unknown optional group, or mkdir the run dir
        run_checks.check_command_line(sys.argv[1:], conf_dir())
    except ValueError as e:
        if env_ranks()[0] == 0:
            print(f"[longctx] error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if env_ranks()[0] == 0:
        sys.argv += run_checks.hydra_dir_overrides(sys.argv[1:])
    else:  # one run dir, chosen by rank 0: the others create no Hydra dir
        sys.argv += [
            "hydra.run.dir=.",
            "hydra.output_subdir=null",
            "hydra/job_logging=disabled",
            "hydra/hydra_logging=disabled",
        ]
    _hydra_main()


if __name__ == "__main__":
    main()
