"""Plain-PyTorch models: never imports torch.distributed."""

from models.config import ModelConfig, RopeConfig
from models.llama import Transformer

__all__ = ["ModelConfig", "RopeConfig", "Transformer"]
