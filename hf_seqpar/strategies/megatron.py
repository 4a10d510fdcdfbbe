"""Megatron-SP: tensor parallelism whose norms, residuals and dropouts stay sequence-sharded.

Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
https://arxiv.org/abs/2205.05198. Over the ``T`` ranks of the SP group ("sp" dimension of the
``dp x sp`` mesh) every decoder layer all-gathers the sequence-sharded hidden states before the
column-parallel q/k/v and gate/up projections and reduce-scatters after the row-parallel o and
down projections: per layer forward 2 all-gathers + 2 reduce-scatters of the local activations
``(B, S/T, h)``, i.e. ``4 (T - 1) B (S/T) h`` elements sent per rank, about ``4 B S h`` whatever
``T``. Expressed with torch's ``torch.distributed.tensor.parallel`` styles; the per-family plans
live in :mod:`hf_seqpar.patches`.

After the column-parallel projections a rank holds ``h/T`` heads of the *full* sequence, so
:meth:`MegatronStrategy.attention` runs the model's own kernel through
:func:`~hf_seqpar.local_attention.full_sequence_attention` with the exact masks of the batch and
no communication. RoPE is applied to q/k before that, so ``shard_batch`` gives the model the
full-sequence ``position_ids`` (:meth:`MegatronStrategy.local_position_ids`).

Gradients: every parameter becomes a DTensor on the SP group. Projection weights are sharded
(``Shard``); norms, embedding, lm_head (and k/v projections whose heads do not split over the
ranks) are replicated and their gradients are ``Partial(sum)`` (each rank's share; summed when
reduced). On every rank
``p.grad.full_tensor()`` is the gradient of the unsharded model (no averaging over the SP
group); with ``dp > 1``, average the gradients over ``dp`` only (:func:`average_gradients_over_dp`).
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ..comm import CollectiveMeter, all_reduce_mean_, all_reduce_sum_replicated, broadcast_
from ..layout import Layout
from ..local_attention import full_sequence_attention
from ..loss import SequenceParallelLoss
from ..mesh import find_state
from .base import check_no_options
from .tp_styles import ReplicatedProjection
from .ulysses import HeadsNotDivisibleError, _divisors

__all__ = ["MegatronStrategy", "full_tensor", "average_gradients_over_dp", "counting"]

#: nn.Module hook dicts that torch's styles register into (they return no handles).
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


class _LocalConfig:
    """A module's config with some fields replaced by this rank's values (Phi-3 head counts)."""

    def __init__(self, config, **overrides):
        self.__dict__.update(overrides)
        self.__dict__["_config"] = config

    def __getattr__(self, name):
        return getattr(self.__dict__["_config"], name)


class _FullStateDict:
    """``state_dict`` post-hook: whole tensors in the checkpoint's own layout (a callable object,
    because torch marks public-API hooks with an attribute)."""

    def __init__(self, base):
        self.base = base

    def __call__(self, module, state_dict, prefix, local_metadata) -> None:
        for key, value in list(state_dict.items()):
            if isinstance(value, DTensor) and key.startswith(prefix):
                state_dict[key] = full_tensor(self.base, key[len(prefix):], value)


def _hook_keys(model) -> dict:
    return {id(m): {d: set(getattr(m, d, {})) for d in _HOOK_DICTS} for m in model.modules()}


def _rank_major(sizes: list[int], tp: int) -> torch.Tensor:
    """Row order that gives rank ``r`` the ``r``-th slice of every fused block."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    # for each rank, for each block: that block's r-th slice of rows
    return torch.cat([torch.arange(s + r * n // tp, s + (r + 1) * n // tp)
                      for r in range(tp) for s, n in zip(starts, sizes)])


def full_tensor(model, name: str, tensor) -> torch.Tensor:
    """The whole tensor of parameter ``name`` (or of its gradient) in the checkpoint's layout.

    Args:
        model: the Megatron-SP model (``name`` relative to its ``PreTrainedModel``).
        name: parameter name, e.g. ``"model.layers.0.self_attn.qkv_proj.weight"``.
        tensor: the parameter or gradient (a DTensor, or a plain tensor returned as is).

    Returns:
        A plain tensor: ``full_tensor()`` of the DTensor (a collective: call it on every rank),
        with fused rows laid back out (Phi-3).
    """
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    state = find_state(model)
    perm = state.strategy_state.get("relayout", {}).get(name) if state is not None else None
    return tensor if perm is None else tensor[torch.argsort(perm).to(tensor.device)]


def average_gradients_over_dp(model) -> None:
    """Average every gradient over the data-parallel replicas (``dp`` dimension only), in place.

    What DDP does, for DTensor gradients: their local shards (or partial sums) are averaged over
    the ranks that hold the same shard in other replicas. No-op when ``dp == 1``.
    """
    state = find_state(model)
    if state is None or state.mesh.size(0) == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            average_gradient_over_dp(p, state)


def average_gradient_over_dp(param, state) -> None:
    """Average one parameter's gradient (its local shard or partial sum) over the ``dp`` group."""
    grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
    all_reduce_mean_(grad, state.dp_group, state.counter)


def counting(model):
    """The :class:`~hf_seqpar.comm.CollectiveMeter` of a model enabled with ``count_comm=True``;
    ``with counting(model): loss.backward()`` also counts the backward's DTensor collectives
    (forwards are counted automatically).

    Raises:
        RuntimeError: the model was enabled without ``count_comm=True``.
    """
    state = find_state(model)
    if state is not None and state.sp_size == 1:
        return contextlib.nullcontext()  # degree 1: no tensor-parallel collectives to count
    meter = state.strategy_state.get("meter") if state is not None else None
    if meter is None:
        raise RuntimeError("enable_sequence_parallel(..., count_comm=True) is needed to count collectives")
    return _MeterContext(meter)


class _MeterContext:
    def __init__(self, meter):
        self.meter = meter

    def __enter__(self):
        self.meter.start()
        return self.meter

    def __exit__(self, *exc):
        self.meter.stop()


class MegatronStrategy:
    """``strategy="megatron"``: tensor parallel over the SP group with sequence-sharded
    norms and residuals (see the module docstring)."""

    name = "megatron"
    description = "tensor parallel + sequence-sharded norms/residuals (Megatron-SP)"
    available = True

    def make_layout(self, seq_len: int, state) -> Layout:
        return Layout("contiguous", seq_len, state.sp_size, state.sp_size)

    def local_position_ids(self, positions: torch.Tensor, layout, rank: int) -> torch.Tensor:
        # q/k are full-sequence when RoPE is applied: every rank needs all (B, S_pad) positions
        return positions

    def check_model(self, config, sp_size: int, options: dict) -> None:
        from hf_seqpar import patches  # late import: the plans import strategies.tp_styles

        check_no_options(self.name, options)
        fam = patches.family(getattr(config, "model_type", None))
        heads = config.num_attention_heads
        if heads % sp_size:
            raise HeadsNotDivisibleError(
                f"Megatron-SP splits attention heads over the SP ranks, but the model has {heads} query heads, "
                f"which sp_size={sp_size} does not divide. Use an sp_size in {_divisors(heads)}, or "
                "strategy='ring'/'hybrid' (no head-count limit)."
            )
        inter = config.intermediate_size
        if inter % sp_size:
            raise ValueError(
                f"Megatron-SP splits the MLP's intermediate size {inter} over sp_size={sp_size} ranks, which "
                f"does not divide it. Use an sp_size in {_divisors(inter)}, or strategy='ulysses'."
            )
        if hasattr(fam, "check"):
            fam.check(config, sp_size)

    def attention(self, module, query, key, value, batch, **kwargs) -> torch.Tensor:
        state = batch.state
        if state.strategy_state["kv_replicated"]:
            key, value = _select_kv(query, key, value, module.config, state.sp_rank)
        # query (B, h/T, S, D), key/value (B, h_kv', S, D): this rank's heads, the full sequence
        return full_sequence_attention(module, query, key, value, batch, state.original_attn_implementation,
                                       **kwargs)

    def apply(self, model, state) -> None:
        from hf_seqpar import patches  # late import: the plans import strategies.tp_styles

        plan = patches.family(model.config.model_type).megatron_plan(model.config, state.sp_size)
        _check_targets(model, plan)
        tp_mesh, tp = state.mesh["sp"], state.sp_size
        data = state.strategy_state
        if tp == 1:  # tensor parallel of degree 1: nothing to split; skip DTensor's per-op dispatch
            data.update(kv_replicated=False)
            return
        data.update(kv_replicated=plan.kv_replicated, relayout={}, configs=[], handles=[], meter=None)
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        data["tied"] = head is not None and head.weight is embed.weight
        before = _hook_keys(model)
        layers = model.get_submodule(plan.layers)
        with torch.no_grad():
            for i, layer in enumerate(layers):
                for pname, sizes in plan.fused.items():
                    perm = _rank_major(sizes, tp)
                    param = layer.get_parameter(pname)
                    param.copy_(param[perm.to(param.device)])  # (rows, in) rows re-laid out rank-major
                    data["relayout"][f"{plan.layers}.{i}.{pname}"] = perm
        for layer in layers:
            parallelize_module(layer, tp_mesh, plan.layer_plan)
            for attr, value in plan.local_head_attrs.items():
                _set_local_attr(layer.self_attn, attr, value // tp, data["configs"])
        parallelize_module(model, tp_mesh, plan.model_plan)
        with torch.no_grad():  # torch's styles scatter shards from rank 0 but keep each rank's replicas:
            for p in model.parameters():  # take rank 0's replicas too, so all weights agree
                if isinstance(p, DTensor) and all(pl.is_replicate() for pl in p.placements):
                    broadcast_(p.to_local(), state.sp_group, state.counter)
        if data["tied"]:
            head.weight = embed.weight
        after = _hook_keys(model)
        data["tp_hooks"] = [(m, d, after[id(m)][d] - before[id(m)][d]) for m in model.modules() for d in _HOOK_DICTS
                            if after[id(m)][d] - before[id(m)][d]]
        data["handles"].append(model.register_state_dict_post_hook(_FullStateDict(model)))
        model.loss_function = SequenceParallelLoss(model.loss_function.inner, combine=all_reduce_sum_replicated)
        if state.counter.enabled:
            _install_meter(model, layers, state)

    def remove(self, model, state) -> None:
        data = state.strategy_state
        for handle in data.pop("handles", []):
            handle.remove()
        for module, dict_name, keys in data.pop("tp_hooks", []):
            for key in keys:
                getattr(module, dict_name).pop(key, None)
        for module, attr, original in reversed(data.pop("configs", [])):
            setattr(module, attr, original)
        with torch.no_grad():
            for module_name, module in model.named_modules():
                module.__dict__.pop("_distribute_module_applied", None)
                for p_name, p in list(module.named_parameters(recurse=False)):
                    if isinstance(p, DTensor):
                        full = full_tensor(model, f"{module_name}.{p_name}".lstrip("."), p.detach())
                        module.register_parameter(p_name, torch.nn.Parameter(full, requires_grad=p.requires_grad))
        if data.get("tied"):
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        data.clear()


def _check_targets(model, plan) -> None:
    """Every module the plan names exists, and every projection it shards is a plain
    ``nn.Linear`` (checked before anything is changed).

    Raises:
        TypeError: a projection is wrapped (PEFT/LoRA adapters) or replaced by another type.
        ValueError: a module the plan names is missing (a variant of the family).
    """
    layers = model.get_submodule(plan.layers)
    targets = [(f"{plan.layers}.{i}.{k}", s) for i in range(len(layers)) for k, s in plan.layer_plan.items()]
    for name, style in targets + list(plan.model_plan.items()):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"the Megatron-SP plan for model_type {model.config.model_type!r} names {name!r}, which this "
                f"{type(model).__name__} does not have; use strategy='ulysses' for this model"
            ) from None
        sharded = isinstance(style, (ColwiseParallel, RowwiseParallel, ReplicatedProjection))
        if sharded and type(module) is not torch.nn.Linear:
            raise TypeError(
                f"Megatron-SP shards nn.Linear projections, but {name} is a {type(module).__module__}."
                f"{type(module).__name__} (PEFT/LoRA adapters wrap projections). strategy='megatron' does not "
                "support wrapped projections in this version: use strategy='ulysses' (which supports LoRA), or "
                "merge the adapters first (`model = model.merge_and_unload()`)."
            )


def _set_local_attr(module, attr: str, value: int, undo: list) -> None:
    if attr.startswith("config."):
        undo.append((module, "config", module.config))
        module.config = _LocalConfig(module.config, **{attr[len("config."):]: value})
    else:
        undo.append((module, attr, getattr(module, attr)))
        setattr(module, attr, value)


def _select_kv(query, key, value, config, rank: int):
    """The kv heads this rank's query heads use, from all kv heads (when they do not split).

    Query head ``j`` of rank ``r`` is global head ``r * h_local + j`` and uses kv head
    ``(r * h_local + j) // G`` with ``G = h / h_kv``.
    """
    h_local, groups = query.shape[1], config.num_attention_heads // key.shape[1]
    first = rank * h_local
    needed = torch.arange(first, first + h_local) // groups  # (h_local,) kv head of each query head
    lo, hi = int(needed[0]), int(needed[-1]) + 1
    if h_local % (hi - lo) == 0 and torch.equal(needed, torch.arange(lo, hi).repeat_interleave(h_local // (hi - lo))):
        return key[:, lo:hi], value[:, lo:hi]  # (B, h_kv, S, D) -> (B, hi - lo, S, D): whole groups
    idx = needed.to(key.device)
    return key.index_select(1, idx), value.index_select(1, idx)  # (B, h_local, S, D): one kv per query


def _install_meter(model, layers, state) -> None:
    """Count DTensor collectives per layer: module hooks set the layer in forward, tensor hooks
    on each layer's input/output set it in backward (reverse order)."""
    groups = [state.sp_group, state.dp_group]
    meter = CollectiveMeter(state.counter, {g.group_name: g.size() for g in groups})
    data = state.strategy_state
    data["meter"] = meter

    def set_layer(layer, phase):
        def hook(*_):
            meter.layer, meter.phase = layer, phase
        return hook

    def layer_pre(i):
        def hook(module, args):
            set_layer(i, "fwd")()
            if args and torch.is_tensor(args[0]) and args[0].requires_grad:
                args[0].register_hook(set_layer(i - 1 if i else None, "bwd"))
        return hook

    def layer_post(i):
        def hook(module, args, out):
            set_layer(None, "fwd")()
            if torch.is_tensor(out) and out.requires_grad:
                out.register_hook(set_layer(i, "bwd"))
        return hook

    for i, layer in enumerate(layers):
        data["handles"].append(layer.register_forward_pre_hook(layer_pre(i)))
        data["handles"].append(layer.register_forward_hook(layer_post(i)))
    data["handles"].append(model.register_forward_pre_hook(lambda *_: meter.start()))
    data["handles"].append(model.register_forward_hook(lambda *_: meter.stop(), always_call=True))
