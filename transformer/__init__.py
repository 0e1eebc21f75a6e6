"""Transformer model built on the ``attention_backends`` registry, plus toy tasks and training."""

from .attention import MultiHeadAttention
from .kv_cache import KVCache, LayerKVCache
from .layers import DecoderLayer, EncoderLayer, causal_mask
from .model import Decoder, Encoder, SinusoidalPositionalEncoding, Transformer
from .tasks import Batch, CopyTask, ReverseTask, SortTask, ToyTask

__all__ = [
    "Batch",
    "CopyTask",
    "Decoder",
    "DecoderLayer",
    "Encoder",
    "EncoderLayer",
    "KVCache",
    "LayerKVCache",
    "MultiHeadAttention",
    "ReverseTask",
    "SinusoidalPositionalEncoding",
    "SortTask",
    "ToyTask",
    "Transformer",
    "causal_mask",
]
