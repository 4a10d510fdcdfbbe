"""The MoE load-balancing (auxiliary) loss of the *whole* sequence under sequence parallelism.

transformers' MoE causal LMs (Mixtral, Qwen2/3-MoE, OLMoE, ...) with ``output_router_logits``
add ``router_aux_loss_coef * load_balancing_loss_func(router_logits)`` to the loss, where

    aux = E * sum_e f_e * P_e,   f_e = (top-k assignments to e) / rows,   P_e = sum of p(e) / rows

over the valid rows (tokens) of every layer. Under SP each rank only sees its own tokens, so the
model computes ``aux`` of its shard: a different value per rank and gradients that do not
average to the unsharded ones. :func:`install` registers a forward hook on the model that
replaces it by the aux loss of the full sequence: the per-expert sums of every rank and the row
count are summed over the SP group with a differentiable all-reduce, and ``aux`` is computed
once from them (the same value on every rank). The all-reduce's backward sums the ranks' output
gradients, so, as for the cross-entropy (:mod:`hf_seqpar.core.loss`), each rank's gradient is ``P``
times its share and the average over ranks is the unsharded gradient.
"""

from __future__ import annotations

import torch

from hf_seqpar.core.comm import all_reduce_sum

__all__ = ["router_spec", "load_balancing_loss", "install"]


def router_spec(config) -> tuple[int, int] | None:
    """``(num_experts, top_k)`` of a MoE config, or None for a dense model."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not experts or not top_k or not hasattr(config, "router_aux_loss_coef"):
        return None
    return int(experts), int(top_k)


def load_balancing_loss(
    router_logits, valid: torch.Tensor, num_experts: int, top_k: int, group=None, counter=None
) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func`` over the tokens of every rank of ``group``.

    Args:
        router_logits: tuple of ``(rows, E)`` per layer (rows: this rank's ``B * S_local`` tokens,
            batch-major) or per MLP tile (then each tile covers a contiguous block of ``valid``'s columns).
        valid: ``(B, S_local)`` bool, True for real tokens (False at user and shard padding).
        num_experts, top_k: the router's.
        group: the SP process group (None: this rank's tokens only).
        counter: optional byte counter.

    Returns:
        The 0-dim fp32 auxiliary loss, equal on every rank of ``group``.
    """
    device = router_logits[0].device
    bsz, local = valid.shape
    tokens = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros(1, dtype=torch.float32, device=device)
    col = 0
    for layer_logits in router_logits:
        width = layer_logits.shape[0] // bsz  # a whole layer, or one MLP tile of it
        mask = valid[:, col : col + width].reshape(-1).to(device, torch.float32)  # (rows,) batch-major
        col = (col + width) % local
        weights = torch.softmax(layer_logits.float(), dim=-1)  # (rows, E)
        _, chosen = torch.topk(weights, top_k, dim=-1)  # (rows, k)
        tokens = tokens.scatter_add(0, chosen.reshape(-1), mask.repeat_interleave(top_k))
        probs = probs + (weights * mask[:, None]).sum(0)
        rows = rows + mask.sum()
    both = torch.cat([tokens, probs, rows])  # (2E + 1,): one collective
    if group is not None:
        both = all_reduce_sum(both, group, counter)
    tokens, probs, rows = both[:num_experts], both[num_experts : 2 * num_experts], both[-1]
    return (tokens / rows * probs / rows).sum() * num_experts


def _hook(module, args, kwargs, output):
    batch = kwargs.get("seqpar")
    router_logits = getattr(output, "router_logits", None)
    if batch is None or not router_logits:
        return output
    spec = router_spec(module.config)
    if spec is None:
        return output
    state = batch.state
    valid = batch.layout.shard(batch.valid, state.sp_rank)
    aux = load_balancing_loss(router_logits, valid, *spec, group=state.sp_group, counter=state.counter)
    if getattr(output, "loss", None) is not None:
        coef = module.config.router_aux_loss_coef
        local = output.aux_loss if getattr(output, "aux_loss", None) is not None else 0.0
        # the model added coef * (this shard's aux); swap it for the full sequence's
        output.loss = output.loss + coef * (aux.to(output.loss.device) - local)
    if hasattr(output, "aux_loss"):
        output.aux_loss = aux
    return output


def install(model):
    """Register the full-sequence aux-loss hook on a MoE causal LM; returns the handle (None for
    a dense model)."""
    if router_spec(model.config) is None:
        return None
    return model.register_forward_hook(_hook, with_kwargs=True)
