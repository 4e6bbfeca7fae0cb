"""Saguaro: speculative speculative decoding (SSD) with a PyTorch and a TensorRT-LLM engine."""
from saguaro.errors import SaguaroError

__all__ = ["SaguaroError"]
