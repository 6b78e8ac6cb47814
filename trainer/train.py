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
import typing

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from models import Transformer
from parallel.mesh import Mesh, env_ranks, init_mesh
from trainer import checkpoint
from trainer.batching import batch_loss, build_loaders, prepare_batch
from trainer.config import TrainConfig, conf_dir, cp_strategies, register_schema, validate
from trainer.engines import build_engine
from trainer.evaluate import evaluate
from trainer.metrics import MetricsLogger, device_peak_flops, flops_per_token
from trainer.optim import build_scheduler


def to_config(cfg: DictConfig) -> TrainConfig:
    """Merge onto the typed schema and instantiate; an unknown key or a wrong type raises a
    one-line ValueError naming the setting."""
    _reject_unknown_keys(cfg, TrainConfig, "")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        return OmegaConf.to_object(merged)
    except ValidationError as e:
        raise ValueError(f"{e.full_key}: {str(e.msg).splitlines()[0]}: fix the value") from None


def _reject_unknown_keys(node, schema: type, prefix: str) -> None:
    """A key the dataclass ``schema`` lacks (e.g. added with ``+optim.lrr=1``) is a typo:
    ValueError naming it, instead of being dropped silently."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node:
        if key == "hydra":
            continue
        if key not in fields:
            raise ValueError(
                f"{prefix}{key} is not a setting: remove it or fix its spelling "
                f"({prefix[:-1] or 'the root'} has: {', '.join(fields)})"
            )
        sub = typing.get_type_hints(schema).get(key)
        if dataclasses.is_dataclass(sub) and OmegaConf.is_dict(node[key]):
            _reject_unknown_keys(node[key], sub, f"{prefix}{key}.")


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
    else:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "runs/default"
    box = [run_dir]
    dist.broadcast_object_list(box, src=0)  # every rank agrees with rank 0's directory
    os.makedirs(box[0], exist_ok=True)
    return box[0]


def build_model(cfg: TrainConfig, device: torch.device) -> Transformer:
    if cfg.init_from is not None:
        from models.hf_io import load_hf_checkpoint

        try:
            hf_cfg, state = load_hf_checkpoint(cfg.init_from)
        except ValueError as e:
            raise ValueError(f"init_from={cfg.init_from!r}: {e}, or set init_from=null to train from scratch") from None
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads"):
            if getattr(hf_cfg, name) != getattr(cfg.model, name):
                raise ValueError(
                    f"model.{name}={getattr(cfg.model, name)} differs from the checkpoint "
                    f"in init_from ({getattr(hf_cfg, name)}): set model.{name}="
                    f"{getattr(hf_cfg, name)} or use a matching model config"
                )
        model = Transformer(cfg.model)
        model.load_state_dict(state, strict=True)
    else:
        torch.manual_seed(cfg.trainer.seed)
        model = Transformer(cfg.model)
    model.checkpoint_layers = cfg.trainer.activation_checkpointing
    return model.to(device)


def train(cfg: TrainConfig) -> dict:
    preempt = _Preemption()  # first: a signal must never kill us
    rank, _, world = env_ranks()
    validate(cfg, world)  # before any collective can hang
    strategies = cp_strategies(cfg)  # {mixer kind: strategy}
    sizes = [u for s in strategies.values() for u in s.subgroup_sizes(cfg.parallel.cp.size, cfg.model.n_heads)]
    mesh = init_mesh(cfg.parallel.cp.size, cfg.trainer.device, sizes)
    run_dir = _resolve_run_dir(cfg, mesh)
    t = cfg.trainer
    train_loader, val_loader, tokenizer = build_loaders(cfg, mesh)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size}): set model.vocab_size={tokenizer.vocab_size}"
        )
    model = build_model(cfg, mesh.device)
    n_params = sum(p.numel() for p in model.parameters())
    engine = build_engine(cfg, model, mesh)  # native (DDP / FSDP2), deepspeed or accelerate
    dp_model, optimizer = engine.model, engine.optimizer
    scheduler = build_scheduler(optimizer, t.steps, cfg.optim)
    step = 0
    resume, skipped = checkpoint.find_resume(run_dir, rank, world)  # newest *complete* checkpoint
    if mesh.is_main:
        for line in skipped:
            print(f"[longctx] {line}", flush=True)
    if resume is not None:
        step = checkpoint.load(run_dir, resume, engine, scheduler, train_loader, rank)
    else:
        torch.manual_seed(t.seed + rank)
    logger = MetricsLogger(
        run_dir,
        OmegaConf.to_container(OmegaConf.structured(cfg)),
        mesh.is_main,
        cfg.logger,
        resumed_from=step if resume is not None else None,
    )
    if mesh.is_main:
        tokens_per_step = cfg.data.seq_len * cfg.data.micro_batch * t.grad_accum * mesh.dp
        print(
            f"[longctx] run_dir={run_dir} world={world} dp={mesh.dp} cp={mesh.cp} "
            f"strategies={','.join(f'{k}:{s.name}' for k, s in strategies.items())} "
            f"layout={cfg.parallel.cp.layout} "
            f"params={n_params / 1e6:.2f}M "
            f"tokens/step={tokens_per_step}" + (f" resumed from step {step}" if resume else "")
        )
    peak = device_peak_flops(mesh.device)
    fpt = flops_per_token(cfg.model, n_params, cfg.data.seq_len)
    autocast = torch.autocast(mesh.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
    train_iter = iter(train_loader)
    bar = _progress(t, step, mesh)
    history, last, window, skips = [], {}, [], 0
    if resume is None:
        ev = evaluate(dp_model, val_loader, tokenizer, cfg, mesh, strategies)  # the starting point
        logger.log(0, ev, console=bar.write if bar is not None else print)
    t0, tokens_since = time.perf_counter(), 0
    end = t.steps if t.stop_after is None else min(t.steps, step + t.stop_after)
    while step < end:
        dp_model.train()
        loss_sum, count_sum = 0.0, 0
        for micro in range(t.grad_accum):
            batch, ctx = prepare_batch(next(train_iter), cfg, mesh, strategies)
            last_micro = micro == t.grad_accum - 1
            with engine.no_sync(not last_micro), autocast:
                logits = dp_model(batch["input_ids"], batch["positions"], ctx)
                loss, ce_sum, count = batch_loss(logits, batch["labels"], mesh)
                engine.backward(loss, last_micro)  # divides by grad_accum
            loss_sum += ce_sum
            count_sum += count
            tokens_since += batch["input_ids"].numel()
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")  # 0: off
        grad_norm = engine.clip_grad_norm(max_norm)  # None: DeepSpeed clips inside step()
        train_loss = loss_sum / max(count_sum, 1)
        # one all-reduce per step: a non-finite loss or grad norm on any rank, a preemption signal
        finite = math.isfinite(train_loss) and (grad_norm is None or math.isfinite(grad_norm))
        bad, stop = _any_rank((not finite, preempt.flag), mesh)
        if bad:
            skips += 1
            _check_nonfinite(t, step + 1, skips, train_loss, float("nan") if grad_norm is None else grad_norm, run_dir)
        else:  # skip: drop the update, keep the data order
            engine.step()
        if grad_norm is None:  # reported after the step: stop before anything is saved
            grad_norm = engine.grad_norm()
            if not bad and not math.isfinite(grad_norm):
                _check_nonfinite(t, step + 1, skips + 1, train_loss, grad_norm, run_dir)
        scheduler.step()
        engine.zero_grad()
        step += 1
        history.append(train_loss)
        if not bad:
            window.append(train_loss)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}")
        if step % t.log_every == 0 or step == end:
            dt = time.perf_counter() - t0
            # every rank holds distinct tokens (its CP shard of its dp rows): world x local tokens
            tok_s = tokens_since * mesh.world_size / max(dt, 1e-9)
            last = {
                "loss": sum(window) / len(window) if window else float("nan"),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_s": tok_s,
            }  # loss: mean since last log
            if skips:
                last["skipped_steps"] = skips
            window = []
            if peak:
                last["mfu"] = tok_s * fpt / (peak * mesh.world_size)
            if mesh.device.type == "cuda":
                last["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            logger.log(step, last, console=bar.write if bar is not None else print)
            t0, tokens_since = time.perf_counter(), 0
        if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
            ev = evaluate(dp_model, val_loader, tokenizer, cfg, mesh, strategies)
            logger.log(step, ev, console=bar.write if bar is not None else print)
            last.update(ev)
        if (t.save_every and step % t.save_every == 0) or step == end or stop:
            checkpoint.save(run_dir, step, engine, scheduler, train_loader, rank, t.keep_checkpoints)
        if stop:
            if mesh.is_main:
                print(f"[longctx] preempted: checkpoint written at step {step}")
            break
    if bar is not None:
        bar.close()
    logger.close()
    return {"step": step, "history": history, "run_dir": run_dir, **last}


def _any_rank(flags: tuple, mesh: Mesh) -> list[bool]:
    """Each flag OR-ed over all ranks, in one all-reduce."""
    x = torch.tensor([int(f) for f in flags], device=mesh.device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return [bool(v) for v in x.tolist()]


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
    if env_ranks()[0] != 0:  # one run dir, chosen by rank 0: the others create no Hydra dir
        sys.argv += [
            "hydra.run.dir=.",
            "hydra.output_subdir=null",
            "hydra/job_logging=disabled",
            "hydra/hydra_logging=disabled",
        ]
    _hydra_main()


if __name__ == "__main__":
    main()
