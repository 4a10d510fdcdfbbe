"""Memory features for 128K+ tokens: chunked lm_head + cross-entropy, tiled MLP, CPU offload.

* :class:`ChunkedLMHeadCrossEntropy` computes ``lm_head`` and the cross-entropy of a shard in
  token chunks and recomputes each chunk's logits in backward, so at most ``chunk x vocab``
  fp32 logits exist at any time (instead of ``shard x vocab``: 64K tokens x 128K vocab x 4 B =
  32 GiB, plus the same again for their gradient).
* :func:`install_memory_features` hooks it into a causal LM without touching transformers'
  functions: it sets an *instance* ``forward`` on the model object (the class is untouched)
  that runs the base model for hidden states and computes the loss itself when labels are
  given; :func:`remove_memory_features` deletes the instance attributes again.
  The same mechanism tiles each decoder layer's MLP along the sequence (recomputed per tile
  in backward) and wraps the forward in ``torch.autograd.graph.save_on_cpu`` to offload the
  activations that gradient checkpointing keeps (the layer inputs) to CPU memory.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

from .comm import all_reduce_sum
from .loss import combines
from .sharding import IGNORE_INDEX

__all__ = [
    "ChunkedLMHeadCrossEntropy",
    "chunked_lm_loss",
    "install_memory_features",
    "remove_memory_features",
    "IGNORE_INDEX",
]

_MARK = "_hf_seqpar_memory"


class ChunkedLMHeadCrossEntropy(torch.autograd.Function):
    """``sum_t CE(hidden_t @ W.T + b, label_t) / normalizer`` in token chunks, logits recomputed
    in backward. Inputs: hidden ``(N, H)``, weight ``(V, H)``, bias ``(V,)`` or None, labels
    ``(N,)`` (``-100`` ignored), chunk size, normalizer (a number or 0-dim tensor)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk: int, normalizer):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least, fp64 stays fp64
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                h, y = hidden[start:start + chunk], labels[start:start + chunk]
                if not bool((y != IGNORE_INDEX).any()):
                    continue
                logits = F.linear(h, weight, bias).to(acc)
                total += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.chunk, ctx.normalizer = chunk, normalizer
        return total / normalizer

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels = ctx.saved_tensors
        acc = torch.promote_types(hidden.dtype, torch.float32)
        scale = (grad_out / ctx.normalizer).to(acc)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if (need_b and bias is not None) else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk):
                h, y = hidden[start:start + ctx.chunk], labels[start:start + ctx.chunk]
                valid = y != IGNORE_INDEX
                if not bool(valid.any()):
                    continue
                # d CE / d logits = softmax - onehot (0 for ignored tokens), times the upstream scale
                g = torch.softmax(F.linear(h, weight, bias).to(acc), dim=-1)
                g[valid, y[valid]] -= 1.0
                g[~valid] = 0.0
                g *= scale
                if grad_h is not None:
                    grad_h[start:start + ctx.chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if grad_w is not None:
                    grad_w += g.t() @ h.to(acc)
                if grad_b is not None:
                    grad_b += g.sum(0)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, lm_head: torch.nn.Module, shift_labels: torch.Tensor, chunk: int,
                    num_items_in_batch=None) -> torch.Tensor:
    """Causal-LM loss of pre-shifted labels without materialising ``(tokens x vocab)`` logits.

    Args:
        hidden: ``(B, S, H)`` final hidden states (after the final norm).
        lm_head: the output projection (an ``nn.Linear``).
        shift_labels: ``(B, S)`` labels already shifted (label of token t+1 at t), ``-100`` ignored.
        chunk: tokens per chunk (``chunk x vocab`` fp32 logits live at a time).
        num_items_in_batch: the normaliser; default the number of labels that are not ``-100``.

    Returns:
        The 0-dim fp32 loss ``sum CE / num_items_in_batch``.

    Raises:
        TypeError: ``lm_head`` is not an ``nn.Linear`` (e.g. a LoRA-wrapped head).
    """
    if not isinstance(lm_head, torch.nn.Linear):
        raise TypeError(
            f"the chunked loss needs the lm_head to be a torch.nn.Linear, got {type(lm_head).__name__}; do not "
            "target lm_head with LoRA, or set loss_chunk_size: null in the SP config to use the plain loss"
        )
    labels = shift_labels.reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        num_items_in_batch = (labels != IGNORE_INDEX).sum().clamp_min(1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(hidden.device, torch.float32)
    flat = hidden.reshape(-1, hidden.shape[-1])
    weight, bias = _local(lm_head.weight), _local(lm_head.bias)
    return ChunkedLMHeadCrossEntropy.apply(flat, weight, bias, labels, int(chunk), num_items_in_batch)


def _local(param):
    """A replicated tensor-parallel parameter (Megatron-SP keeps lm_head replicated) as a plain
    tensor whose gradient is a partial sum over the ranks (each saw only its own tokens)."""
    from torch.distributed.tensor import DTensor, Partial

    if isinstance(param, DTensor):
        return param.to_local(grad_placements=[Partial()] * len(param.placements))
    return param


def _check_chunkable(model) -> None:
    cfg = model.config
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(cfg, attr, None) not in (None, 1.0):
            raise ValueError(
                f"{type(model).__name__} transforms its logits ({attr}={getattr(cfg, attr)}); the chunked loss "
                "computes plain lm_head logits. Set loss_chunk_size: null for this model."
            )
    if not hasattr(model, model.base_model_prefix) or model.get_output_embeddings() is None:
        raise TypeError(f"{type(model).__name__} is not a causal LM with a base model and an lm_head")


def _chunked_forward(chunk: int):
    """An instance ``forward`` for a ``*ForCausalLM`` model: the loss through the chunked function."""

    def forward(self, input_ids=None, labels=None, **kwargs: Any):
        if labels is None:  # generation / logits wanted: the class forward, untouched
            return type(self).forward(self, input_ids=input_ids, **kwargs)
        shift_labels = kwargs.pop("shift_labels", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)
        seqpar = kwargs.get("seqpar")
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
        base = getattr(self, self.base_model_prefix)
        out = base(input_ids=input_ids, **kwargs)
        loss = chunked_lm_loss(out.last_hidden_state, self.get_output_embeddings(), shift_labels, chunk, num_items)
        if combines(seqpar):  # the exact SP loss: sum_local / N, summed over the SP group
            combine = getattr(self.loss_function, "combine", all_reduce_sum)  # the strategy's (see loss.py)
            loss = combine(loss, seqpar.state.sp_group, seqpar.state.counter)
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=out.hidden_states, attentions=out.attentions)

    return forward


def _tiled_mlp_forward(tiles: int):
    def forward(self, x):
        n = x.shape[-2]
        if n < 2 or tiles < 2:
            return type(self).forward(self, x)
        pieces = torch.tensor_split(x, min(tiles, n), dim=-2)
        run = lambda t: type(self).forward(self, t)  # noqa: E731
        if torch.is_grad_enabled():
            return torch.cat([checkpoint(run, p, use_reentrant=False) for p in pieces], dim=-2)
        return torch.cat([run(p) for p in pieces], dim=-2)

    return forward


def _offload_forward(inner):
    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return inner(*args, **kwargs)

    return forward


def install_memory_features(model, loss_chunk_size: int | None = None, mlp_tiles: int | None = None,
                            offload_checkpoints: bool = False) -> None:
    """Switch on the memory features on a ``*ForCausalLM`` model, in place (reversible).

    Args:
        model: the transformers model (not a DDP/PEFT wrapper: pass ``unwrap_model(model)``).
        loss_chunk_size: tokens per lm_head + cross-entropy chunk; None keeps the model's loss.
        mlp_tiles: split the sequence into this many tiles inside every ``.mlp`` module, each
            recomputed in backward; None or 1 = off.
        offload_checkpoints: run the forward under ``save_on_cpu``, so the tensors autograd keeps
            live in CPU memory; with gradient checkpointing these are essentially the layer inputs
            (torch's checkpoint saves them through the saved-tensor hooks, reentrant or not).

    Raises:
        ValueError: the model transforms its logits (soft-capping), or a size is not positive.
        TypeError: not a causal LM with an lm_head.
    """
    remove_memory_features(model)
    for name, value in (("loss_chunk_size", loss_chunk_size), ("mlp_tiles", mlp_tiles)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    installed = []
    if loss_chunk_size:
        _check_chunkable(model)
        model.forward = types.MethodType(_chunked_forward(loss_chunk_size), model)
        installed.append(model)
    if mlp_tiles and mlp_tiles > 1:
        mlps = [m for n, m in model.named_modules() if n.endswith(".mlp")]
        if not mlps:
            raise TypeError(f"{type(model).__name__} has no `.mlp` modules to tile")
        for m in mlps:
            m.forward = types.MethodType(_tiled_mlp_forward(mlp_tiles), m)
            installed.append(m)
    if offload_checkpoints:
        model.forward = types.MethodType(_offload_forward(model.forward), model)
        if model not in installed:
            installed.append(model)
    setattr(model, _MARK, installed)


def remove_memory_features(model) -> None:
    """Undo :func:`install_memory_features` (deletes the instance ``forward`` attributes)."""
    for m in getattr(model, _MARK, []):
        m.__dict__.pop("forward", None)
    model.__dict__.pop(_MARK, None)
