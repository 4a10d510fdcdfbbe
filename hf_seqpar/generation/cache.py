"""A KV cache sharded along the sequence over the SP group, as a transformers ``Cache``.

Each rank holds the keys and values of its own prompt shard (the positions the strategy's layout
gives it: contiguous for Ulysses, zigzag chunks for ring and hybrid, storage order kept) and a
share of the generated tokens: the token at global position ``t`` is appended on SP rank
``t % P`` only (round robin), so the shards never differ by more than one token. Softmax attention
over a set of keys does not depend on their order, so a rank's keys need no sorting; which of
them a query may see is the ``valid`` mask (user padding and shard padding are False).

The cache goes through the public cache API only: :class:`ShardedLayer` is a
``CacheLayerMixin``, :class:`ShardedCache` a ``Cache`` of them. ``get_seq_length`` reports the
*global* number of tokens seen (what ``generate`` uses to slice its inputs), not the local one.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["ShardedLayer", "ShardedCache", "kv_bytes_per_token"]


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, elem: int) -> int:
    """Bytes of keys and values one token adds to an unsharded cache: ``2 L h_kv d elem``."""
    return 2 * layers * kv_heads * head_dim * elem


class ShardedLayer(CacheLayerMixin):
    """One layer's share of the sequence-sharded cache.

    Attributes:
        keys, values: ``(B, h_kv, L_local, D)`` this rank's keys and values.
        valid: ``(B, L_local)`` bool, which of them a query may attend to.
        seen: global tokens seen by this layer (prompt and generated, shard padding excluded).
    """

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, cache: "ShardedCache"):
        super().__init__()
        self.cache = cache
        self.valid: torch.Tensor | None = None
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        bsz, heads, _, dim = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_empty((bsz, heads, 0, dim))
        self.values = value_states.new_empty((bsz, heads, 0, value_states.shape[-1]))
        self.valid = torch.zeros((bsz, 0), dtype=torch.bool, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Prefill: keep this rank's shard whole and hand it back (the strategy's attention runs on
        it). Decode (one token): append it if this rank owns its position; return the local shard."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        prefill = self.cache.prefill_state
        if prefill is not None:
            if self.seen:
                raise RuntimeError("the sharded cache is prefilled once, before any decode step")
            valid, seq_len = prefill
            self.keys, self.values, self.valid, self.seen = key_states, value_states, valid, seq_len
            return key_states, value_states
        if key_states.shape[2] != 1:
            raise ValueError(
                f"a decode step over the sharded cache takes one token per row, got "
                f"{key_states.shape[2]}; the prompt is prefilled by hf_seqpar.generate"
            )
        if self.seen % self.cache.sp_size == self.cache.sp_rank:  # round robin: position t on rank t % P
            self.keys = torch.cat([self.keys, key_states], dim=2)
            self.values = torch.cat([self.values, value_states], dim=2)
            self.valid = torch.cat([self.valid, self.valid.new_ones((self.valid.shape[0], 1))], dim=1)
        self.seen += 1
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.valid = None
        self.is_initialized, self.seen = False, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("the sequence-sharded cache has no beam search (hf_seqpar.generate refuses it)")

    def nbytes(self) -> int:
        """Bytes of this rank's keys and values."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class ShardedCache(Cache):
    """The sequence-sharded KV cache of one SP rank (see the module docstring).

    Args:
        num_layers: decoder layers of the model.
        sp_size: ranks of the SP group.
        sp_rank: this rank's index in it.
    """

    def __init__(self, num_layers: int, sp_size: int, sp_rank: int):
        self.sp_size, self.sp_rank = sp_size, sp_rank
        self.prefill_state: tuple[torch.Tensor, int] | None = None
        super().__init__(layers=[ShardedLayer(self) for _ in range(num_layers)])

    @contextlib.contextmanager
    def prefilling(self, valid: torch.Tensor, seq_len: int):
        """While active, every layer's update stores the prompt shard it is given.

        Args:
            valid: ``(B, L_local)`` which local positions are real tokens.
            seq_len: global prompt tokens being prefilled (without shard padding).
        """
        self.prefill_state = (valid, seq_len)
        try:
            yield self
        finally:
            self.prefill_state = None

    def local_tokens(self) -> int:
        """Positions (shard padding included) this rank holds per layer."""
        layer = self.layers[0]
        return layer.keys.shape[2] if layer.is_initialized else 0

    def nbytes(self) -> int:
        """Bytes of keys and values this rank holds, all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def report(self) -> dict:
        """This rank's KV bytes against an unsharded cache of the same tokens.

        Returns:
            ``{"local_bytes", "unsharded_bytes", "fraction", "local_tokens", "tokens"}``:
            ``unsharded_bytes`` counts every global token once (no shard padding), ``tokens`` the
            global tokens cached, ``local_tokens`` the positions this rank holds per layer.
        """
        unsharded = 0
        for layer in self.layers:
            if layer.is_initialized:
                per_token = (
                    layer.keys[:, :, :1].numel() * layer.keys.element_size()
                    + layer.values[:, :, :1].numel() * layer.values.element_size()
                )
                unsharded += per_token * layer.seen
        local = self.nbytes()
        return {
            "local_bytes": local,
            "unsharded_bytes": unsharded,
            "fraction": local / unsharded if unsharded else 0.0,
            "local_tokens": self.local_tokens(),
            "tokens": self.layers[0].seen if self.layers else 0,
        }
