"""A longctx run dir -> a Hugging Face checkpoint directory (transformers loads it):

    longctx-export RUN_DIR OUT_DIR [--model-type llama|qwen2|mistral]
    python -m trainer.export RUN_DIR OUT_DIR [--model-type ...]

Takes the newest complete checkpoint (native DCP or DeepSpeed, any ZeRO stage), its stage's
model settings (LoRA merged), and writes config.json + model.safetensors with
models.hf_io.save_hf_checkpoint. The model type defaults to qwen2 for q/k/v biases, mistral
for a sliding window, llama otherwise. No process group is needed.
"""

from __future__ import annotations

import argparse
import sys

from models.config import ModelConfig


def model_config(meta: dict) -> ModelConfig:
    """The ModelConfig a checkpoint's meta recorded (the settings of its stage)."""
    from omegaconf import OmegaConf

    saved = meta.get("config", {}).get("model")
    if saved is None:
        raise ValueError("the checkpoint's manifest has no model settings (written by an older longctx): re-save it")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), saved))


def default_model_type(cfg: ModelConfig) -> str:
    if cfg.attention_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window is not None else "llama"


def export(run_dir: str, out_dir: str, model_type: str | None = None) -> str:
    """Write the run's newest complete checkpoint to ``out_dir`` as Hugging Face; returns the
    checkpoint directory it came from."""
    from models import Transformer
    from models.hf_io import save_hf_checkpoint
    from trainer import checkpoint

    meta, weights = checkpoint.load_run_weights(run_dir)  # native or DeepSpeed
    cfg = model_config(meta)
    model = Transformer(cfg)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{run_dir!r}: the weights do not match the saved model settings ({str(e)[:200]})") from None
    save_hf_checkpoint(model, out_dir, model_type or default_model_type(cfg))
    return checkpoint.newest_complete(run_dir)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="longctx-export", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a longctx run dir (trainer.run_dir)")
    ap.add_argument("out_dir", help="the Hugging Face directory to write (created)")
    ap.add_argument("--model-type", choices=("llama", "qwen2", "mistral"), default=None)
    args = ap.parse_args(argv)
    try:
        src = export(args.run_dir, args.out_dir, args.model_type)
    except ValueError as e:
        print(f"[longctx] error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"[longctx] exported {src} to {args.out_dir}")


if __name__ == "__main__":
    main()
