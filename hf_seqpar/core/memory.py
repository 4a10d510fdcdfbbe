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
  activations that gradient checkpointing keeps (the layer inputs) to CPU memory, and gives the
  Llama-style RMSNorms the lean forward of :mod:`hf_seqpar.core.norm` (``lean_norms``).
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

from hf_seqpar.core import moe, norm
from hf_seqpar.core.logits import LogitTransform, logit_transform
from hf_seqpar.core.loss import combine_over_sp
from hf_seqpar.core.sharding import IGNORE_INDEX

__all__ = [
    "ChunkedLMHeadCrossEntropy",
    "chunked_lm_loss",
    "install_memory_features",
    "check_memory_features",
    "remove_memory_features",
    "IGNORE_INDEX",
]

_MARK = "_hf_seqpar_memory"


class ChunkedLMHeadCrossEntropy(torch.autograd.Function):
    """``sum_t CE(f(hidden_t @ W.T + b), label_t) / normalizer`` in token chunks, logits recomputed
    in backward. Inputs: hidden ``(N, H)``, weight ``(V, H)``, bias ``(V,)`` or None, labels
    ``(N,)`` (``-100`` ignored), chunk size, normalizer (a number or 0-dim tensor), and the logit
    transformation ``f(z) = softcap * tanh(scale * z / softcap)`` (``scale * z`` when ``softcap``
    is None; see :class:`hf_seqpar.core.logits.LogitTransform`).

    With ``norm_weight`` (the ``lean_norms`` feature) ``hidden`` is the input of the model's final
    Llama-style RMSNorm, computed here per chunk (:func:`hf_seqpar.core.norm.llama_rms_norm`) and again
    in backward: only its input is saved (``e h`` per token, not input, ``rstd`` and output), and the
    norm's gradients are autograd's of the same operations, per chunk (the weight's summed in fp32)."""

    @staticmethod
    def _logits(h, weight, bias, acc, scale, softcap):
        """``(f(z), dz_factor)``: the transformed fp32 logits and ``d f / d z`` (None when constant)."""
        z = F.linear(h, weight, bias).to(acc)
        if scale != 1.0:
            z = z * scale
        if softcap is None:
            return z, None
        t = torch.tanh(z / softcap)
        return t * softcap, (1.0 - t * t) * scale

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        labels,
        chunk: int,
        normalizer,
        scale: float = 1.0,
        softcap=None,
        norm_weight=None,
        norm_eps: float = 0.0,
    ):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least, fp64 stays fp64
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                h, y = hidden[start : start + chunk], labels[start : start + chunk]
                if not bool((y != IGNORE_INDEX).any()):
                    continue
                if norm_weight is not None:
                    h = norm.llama_rms_norm(h, norm_weight, norm_eps)
                logits, _ = ChunkedLMHeadCrossEntropy._logits(h, weight, bias, acc, scale, softcap)
                total += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
        ctx.save_for_backward(hidden, weight, bias, labels, norm_weight)
        ctx.chunk, ctx.normalizer, ctx.scale, ctx.softcap, ctx.norm_eps = chunk, normalizer, scale, softcap, norm_eps
        return total / normalizer

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, norm_weight = ctx.saved_tensors
        acc = torch.promote_types(hidden.dtype, torch.float32)
        scale = (grad_out / ctx.normalizer).to(acc)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_nw = norm_weight is not None and ctx.needs_input_grad[8]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if (need_b and bias is not None) else None
        grad_nw = torch.zeros_like(norm_weight, dtype=acc) if need_nw else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk):
                h, y = hidden[start : start + ctx.chunk], labels[start : start + ctx.chunk]
                valid = y != IGNORE_INDEX
                if not bool(valid.any()):
                    continue  # no label: zero gradients (through the norm too)
                if norm_weight is not None:  # the final norm of this chunk again, with autograd's graph
                    with torch.enable_grad():
                        x = h.detach().requires_grad_(need_h)
                        normed = norm.llama_rms_norm(x, norm_weight.detach(), ctx.norm_eps)
                    x_in, h = h, normed.detach()
                # d CE / d logits = softmax - onehot (0 for ignored tokens), times the upstream scale
                logits, dz = ChunkedLMHeadCrossEntropy._logits(h, weight, bias, acc, ctx.scale, ctx.softcap)
                g = torch.softmax(logits, dim=-1)
                g[valid, y[valid]] -= 1.0
                g[~valid] = 0.0
                g *= scale
                # chain rule through the logit transformation: d f / d z
                g = g * dz if dz is not None else (g * ctx.scale if ctx.scale != 1.0 else g)
                g_h = (g.to(weight.dtype) @ weight).to(h.dtype) if (grad_h is not None or need_nw) else None
                if need_nw:  # the weight's share of weight * n: the product as autograd forms it, summed in fp32
                    grad_nw += (g_h * norm.normalized(x_in, ctx.norm_eps)).flatten(0, -2).sum(0, dtype=acc)
                if norm_weight is not None and need_h:
                    (g_h,) = torch.autograd.grad(normed, x, g_h)
                if grad_h is not None:
                    grad_h[start : start + ctx.chunk] = g_h.to(hidden.dtype)
                if grad_w is not None:
                    grad_w += g.t() @ h.to(acc)
                if grad_b is not None:
                    grad_b += g.sum(0)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        grad_nw = grad_nw.to(norm_weight.dtype) if grad_nw is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, grad_nw, None


def chunked_lm_loss(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    shift_labels: torch.Tensor,
    chunk: int,
    num_items_in_batch=None,
    transform: LogitTransform | None = None,
    final_norm: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Causal-LM loss of pre-shifted labels without materialising ``(tokens x vocab)`` logits.

    Args:
        hidden: ``(B, S, H)`` final hidden states (after the final norm).
        lm_head: the output projection (an ``nn.Linear``).
        shift_labels: ``(B, S)`` labels already shifted (label of token t+1 at t), ``-100`` ignored.
        chunk: tokens per chunk (``chunk x vocab`` fp32 logits live at a time).
        num_items_in_batch: the normaliser; default the number of labels that are not ``-100``.
        transform: what the model does to ``lm_head``'s output (scaling, soft-capping); default none.
        final_norm: a Llama-style RMSNorm (:data:`hf_seqpar.core.norm.LLAMA_STYLE_NORMS`) to apply to
            ``hidden`` first, per chunk (``hidden`` is then its input; only that is saved).

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
    transform = transform or LogitTransform()
    nw, eps = (None, 0.0) if final_norm is None else (_local(final_norm.weight), float(final_norm.variance_epsilon))
    return ChunkedLMHeadCrossEntropy.apply(
        flat, weight, bias, labels, int(chunk), num_items_in_batch, float(transform.scale), transform.softcap, nw, eps
    )


def _local(param):
    """A replicated tensor-parallel parameter (Megatron-SP keeps lm_head replicated) as a plain
    tensor whose gradient is a partial sum over the ranks (each saw only its own tokens)."""
    from torch.distributed.tensor import DTensor, Partial

    if isinstance(param, DTensor):
        return param.to_local(grad_placements=[Partial()] * len(param.placements))
    return param


def _check_chunkable(model) -> LogitTransform:
    if not hasattr(model, model.base_model_prefix) or model.get_output_embeddings() is None:
        raise TypeError(f"{type(model).__name__} is not a causal LM with a base model and an lm_head")
    return logit_transform(model)


def _chunked_forward(chunk: int, transform: LogitTransform, fused_norm=None):
    """An instance ``forward`` for a ``*ForCausalLM`` model: the loss through the chunked function
    (which also computes ``fused_norm``, the final norm, unless the hidden states are asked for)."""

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
        fuse = fused_norm if not (kwargs.get("output_hidden_states") or self.config.output_hidden_states) else None
        with _skipped(fuse):
            out = base(input_ids=input_ids, **kwargs)
        # what the loss saves (hidden states, labels) stays on the device, also under offload_checkpoints'
        # save_on_cpu (the innermost hooks apply): the loss's backward runs first and needs them on the
        # device then anyway, so a host copy would take host memory without lowering the device peak
        with torch.autograd.graph.saved_tensors_hooks(_same, _same):
            loss = chunked_lm_loss(
                out.last_hidden_state, self.get_output_embeddings(), shift_labels, chunk, num_items, transform, fuse
            )
        loss = combine_over_sp(loss, seqpar)  # the exact SP loss: sum_local / N, summed over the SP group
        router_logits = getattr(out, "router_logits", None)
        if not router_logits:
            return CausalLMOutputWithPast(
                loss=loss, logits=None, hidden_states=out.hidden_states, attentions=out.attentions
            )
        # MoE: under SP the hook of hf_seqpar.core.moe adds the full sequence's aux loss to this output
        aux = None
        spec = moe.router_spec(self.config)
        if seqpar is None and spec is not None:
            mask = kwargs.get("attention_mask")
            valid = mask.bool() if mask is not None else torch.ones(labels.shape, dtype=torch.bool)
            aux = moe.load_balancing_loss(router_logits, valid, *spec)
            loss = loss + self.config.router_aux_loss_coef * aux.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux,
            logits=None,
            router_logits=router_logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    return forward


def _same(t):
    return t


@contextlib.contextmanager
def _skipped(module):
    """``module`` (when not None) returns its input unchanged inside the block (its instance ``forward``,
    if any, is put back after): the base model's final norm while the chunked loss computes it."""
    if module is None:
        yield
        return
    own = module.__dict__.get("forward")
    module.forward = lambda x: x
    try:
        yield
    finally:
        if own is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = own


def _tiled_mlp_forward(tiles: int):
    def forward(self, x):
        run = lambda t: type(self).forward(self, t.contiguous())  # noqa: E731  (MLPs that .view their input)
        n = x.shape[-2]
        if n < 2 or tiles < 2:
            return type(self).forward(self, x)
        pieces = _tiles(x, tiles)
        if torch.is_grad_enabled():
            return torch.cat([checkpoint(run, p, use_reentrant=False) for p in pieces], dim=-2)
        return torch.cat([run(p) for p in pieces], dim=-2)

    return forward


def _tiles(x, tiles: int) -> list:
    """The sequence tiles of an MLP input ``(B, S, H)`` (views; made contiguous by the caller).

    Megatron-SP hands the MLP the all-gathered sequence (a replicated DTensor of ``T`` equal
    shards) and reduce-scatters its output along the sequence, so each tile's output comes back
    as "this rank's 1/T of the tile". Tile ``j`` is therefore made of the ``j``-th piece of every
    rank's shard: ``(B, T * s_j, H)`` whose reduce-scatter returns exactly this rank's ``j``-th
    piece, and the concatenated tiles are this rank's shard in order.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(x, DTensor):
        return torch.tensor_split(x, min(tiles, x.shape[-2]), dim=-2)
    world = x.device_mesh.size()
    grouped = x.unflatten(-2, (world, x.shape[-2] // world))  # (B, T, S/T, H): rank r's shard at [:, r]
    pieces = torch.tensor_split(grouped, min(tiles, grouped.shape[-2]), dim=-2)
    return [p.flatten(-3, -2) for p in pieces]  # (B, T * s_j, H)


def _offload_forward(inner):
    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return inner(*args, **kwargs)

    return forward


def check_memory_features(model, loss_chunk_size: int | None = None, mlp_tiles: int | None = None):
    """Check, without changing the model, that :func:`install_memory_features` can apply these
    features (called before sequence parallelism is enabled, so a refusal leaves the model as it was).

    Returns:
        The model's :class:`~hf_seqpar.core.logits.LogitTransform` when ``loss_chunk_size`` is set, else None.

    Raises:
        ValueError, TypeError: as :func:`install_memory_features`.
    """
    for name, value in (("loss_chunk_size", loss_chunk_size), ("mlp_tiles", mlp_tiles)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if mlp_tiles and mlp_tiles > 1 and not any(n.endswith(".mlp") for n, _ in model.named_modules()):
        raise TypeError(f"{type(model).__name__} has no `.mlp` modules to tile; set mlp_tiles: null")
    return _check_chunkable(model) if loss_chunk_size else None


def install_memory_features(
    model,
    loss_chunk_size: int | None = None,
    mlp_tiles: int | None = None,
    offload_checkpoints: bool = False,
    *,
    lean_norms: bool = False,
) -> None:
    """Switch on the memory features on a ``*ForCausalLM`` model, in place (reversible).

    Args:
        model: the transformers model (not a DDP/PEFT wrapper: pass ``unwrap_model(model)``).
        loss_chunk_size: tokens per lm_head + cross-entropy chunk; None keeps the model's loss.
        mlp_tiles: split the sequence into this many tiles inside every ``.mlp`` module, each
            recomputed in backward; None or 1 = off.
        offload_checkpoints: run the forward under ``save_on_cpu``, so the tensors autograd keeps
            live in CPU memory; with gradient checkpointing these are essentially the layer inputs
            (torch's checkpoint saves them through the saved-tensor hooks, reentrant or not).
        lean_norms: give the model's Llama-style RMSNorms the forward of :mod:`hf_seqpar.core.norm`
            (saves the input and fp32 ``rstd`` instead of an fp32 copy; same numbers); with
            ``loss_chunk_size`` the chunked loss computes the final norm itself, per chunk.

    Raises:
        ValueError: the model transforms its logits in a way the chunked loss cannot reproduce
            (see :func:`hf_seqpar.core.logits.logit_transform`), or a size is not positive.
        TypeError: not a causal LM with an lm_head.
    """
    remove_memory_features(model)
    transform = check_memory_features(model, loss_chunk_size, mlp_tiles)
    installed = []
    if loss_chunk_size:
        fused = norm.final_norm(model) if lean_norms else None
        model.forward = types.MethodType(_chunked_forward(loss_chunk_size, transform, fused), model)
        installed.append(model)
    if mlp_tiles and mlp_tiles > 1:
        for m in [m for n, m in model.named_modules() if n.endswith(".mlp")]:
            m.forward = types.MethodType(_tiled_mlp_forward(mlp_tiles), m)
            installed.append(m)
    if offload_checkpoints:
        model.forward = types.MethodType(_offload_forward(model.forward), model)
        if model not in installed:
            installed.append(model)
    if lean_norms:
        for m in norm.lean_norms_of(model):
            m.forward = types.MethodType(norm.lean_forward, m)
            installed.append(m)
    setattr(model, _MARK, installed)


def remove_memory_features(model) -> None:
    """Undo :func:`install_memory_features` (deletes the instance ``forward`` attributes)."""
    for m in getattr(model, _MARK, []):
        m.__dict__.pop("forward", None)
    model.__dict__.pop(_MARK, None)
