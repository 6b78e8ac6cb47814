"""What ``init_from=`` means for the model the run builds.

A Hugging Face directory defines the architecture: every field its config.json holds (RoPE
theta and scaling, norm eps, biases, tied embeddings, head / ffn sizes, sliding window, vocab)
comes from it, and only settings the user gave explicitly win; those are named in the log. A
setting counts as explicit when it is on the Hydra command line (``model.norm_eps=1e-5``, also
when equal to the default) or differs from the ModelConfig default (set by an experiment, a
model group or a command line). A longctx run dir keeps the run's settings: its weights are
carried as between stages (trainer/stages.py), and a mixer pattern that differs from the run's
without being set is warned about.
"""

from __future__ import annotations

import dataclasses
import json
import os

from models.config import ModelConfig, RopeConfig


def _hydra_model_keys() -> set[str]:
    """``model.*`` keys on the Hydra command line (empty outside a Hydra app)."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover -- hydra is a dependency
        return set()
    if not HydraConfig.initialized():
        return set()
    from trainer.run_checks import override_keys

    keys = override_keys(list(HydraConfig.get().overrides.task))
    return {key[len("model.") :] for key in keys if key.startswith("model.")}


def explicit_model_keys(model: ModelConfig, named: set[str] | None = None) -> set[str]:
    """ModelConfig fields (``rope.<field>`` for RoPE) the user set: ``named`` (default: the Hydra
    command line's ``model.*`` keys) and every field that differs from the ModelConfig default."""
    keys = set(_hydra_model_keys() if named is None else named)
    default = ModelConfig()
    for f in dataclasses.fields(ModelConfig):
        if f.name == "rope":
            for r in dataclasses.fields(RopeConfig):
                if getattr(model.rope, r.name) != getattr(default.rope, r.name):
                    keys.add(f"rope.{r.name}")
        elif getattr(model, f.name) != getattr(default, f.name):
            keys.add(f.name)
    return keys


def is_run_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


def resolve(cfg, named: set[str] | None = None, log: bool = True):
    """``cfg`` (a TrainConfig) with the model ``init_from`` defines (module docstring); the same
    object when there is nothing to change. ``log``: print what was taken (rank 0)."""
    if cfg.init_from is None or not os.path.isdir(cfg.init_from):
        return cfg
    if is_run_dir(cfg.init_from):
        return cfg
    from models.hf_io import merge_config, read_hf_config

    try:
        ckpt, defined = read_hf_config(cfg.init_from)
        model, overridden = merge_config(ckpt, cfg.model, explicit_model_keys(cfg.model, named), defined)
    except ValueError as e:
        raise ValueError(f"init_from={cfg.init_from!r}: {e}") from None
    if log:
        r = model.rope
        _say(
            f"init_from={cfg.init_from}: the model of its config.json (vocab {model.vocab_size}, dim {model.dim}, "
            f"{model.n_layers} layers, {model.n_heads}/{model.n_kv_heads} heads, head_dim {model.hd}, ffn {model.ffn}, "
            f"rope theta {r.theta:g} type {r.type}, norm_eps {model.norm_eps:g}, attention_bias "
            f"{model.attention_bias}, tied {model.tie_embeddings}, sliding_window {model.sliding_window})"
            + (f"; your settings override: {', '.join('model.' + o for o in overridden)}" if overridden else "")
        )
    if model == cfg.model:
        return cfg
    return dataclasses.replace(cfg, model=model)


def warn_mixer_pattern(cfg, named: set[str] | None = None) -> None:
    """A line when ``init_from`` is a run dir trained with other mixers than ``cfg`` builds and
    the user did not set model.mixer_pattern (e.g. recipe=extend on a hybrid run)."""
    if cfg.init_from is None or not is_run_dir(cfg.init_from):
        return
    theirs = _saved_pattern(cfg.init_from)
    ours = list(cfg.model.mixer_pattern)
    if theirs is not None and list(theirs) != ours and "mixer_pattern" not in explicit_model_keys(cfg.model, named):
        _say(
            f"warning: init_from={cfg.init_from} was trained with model.mixer_pattern={list(theirs)}, this "
            f"run builds {ours} (not set by you): set model.mixer_pattern={list(theirs)} to keep its mixers"
        )


def _saved_pattern(run_dir: str):
    """The mixer pattern in the newest checkpoint's manifest (None when unreadable)."""
    from trainer import checkpoint

    ckpt = checkpoint.newest_complete(run_dir)
    if ckpt is None:
        return None
    with open(os.path.join(ckpt, checkpoint.MANIFEST)) as f:
        return json.load(f).get("meta", {}).get("config", {}).get("model", {}).get("mixer_pattern")


def _say(line: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[longctx] {line}", flush=True)
