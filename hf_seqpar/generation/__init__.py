"""Generation under sequence parallelism: SP prefill, KV cache sharded along the sequence, decode
attention merged by log-sum-exp over the SP group (``hf_seqpar.generate``)."""

from hf_seqpar.generation.cache import ShardedCache, ShardedLayer, kv_bytes_per_token
from hf_seqpar.generation.generate import UNSUPPORTED_KWARGS, check_generation, generate

__all__ = ["generate", "check_generation", "ShardedCache", "ShardedLayer", "kv_bytes_per_token", "UNSUPPORTED_KWARGS"]
