"""Apply a tensor-parallel plan (:class:`hf_seqpar.patches.MegatronPlan`) to a causal LM over a 1-D
mesh, and undo it; export whole tensors in the checkpoint's layout; average gradients over ``dp``;
count DTensor collectives.

Every parameter becomes a DTensor on the tensor-parallel mesh. Projection weights are sharded
(``Shard``); norms, embedding, lm_head (and k/v projections whose heads do not split over the
ranks) are replicated and their gradients are ``Partial(sum)`` (each rank's share; summed when
reduced). On every rank ``p.grad.full_tensor()`` is the gradient of the unsharded model.
Expressed with torch's public ``torch.distributed.tensor.parallel`` styles (``parallelize_module``).
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from hf_seqpar.core.comm import CollectiveMeter, broadcast_
from hf_seqpar.core.mesh import find_state
from hf_seqpar.tp.styles import ReplicatedProjection

__all__ = ["TensorParallel", "full_tensor", "average_gradients_over_dp", "counting"]

#: nn.Module hook dicts that torch's styles register into (they return no handles).
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


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

    def __init__(self, tp):
        self.tp = tp

    def __call__(self, module, state_dict, prefix, local_metadata) -> None:
        for key, value in list(state_dict.items()):
            if isinstance(value, DTensor) and key.startswith(prefix):
                state_dict[key] = self.tp.full_tensor(key[len(prefix) :], value)


def _hook_keys(model) -> dict:
    return {id(m): {d: set(getattr(m, d, {})) for d in _HOOK_DICTS} for m in model.modules()}


def _rank_major(sizes: list[int], tp: int) -> torch.Tensor:
    """Row order that gives rank ``r`` the ``r``-th slice of every fused block."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    # for each rank, for each block: that block's r-th slice of rows
    return torch.cat(
        [torch.arange(s + r * n // tp, s + (r + 1) * n // tp) for r in range(tp) for s, n in zip(starts, sizes)]
    )


class TensorParallel:
    """The tensor-parallel state of one model: what :meth:`apply` changed and :meth:`undo` restores.

    Args:
        mesh: the 1-D tensor-parallel ``DeviceMesh`` (Megatron-SP: the ``"sp"`` dimension).
        counter: the :class:`~hf_seqpar.core.comm.CommCounter` (``counter.enabled``: meter the
            DTensor collectives per layer).
    """

    def __init__(self, mesh, counter):
        self.mesh, self.counter = mesh, counter
        self.size = mesh.size()
        self.relayout: dict = {}
        """Fused parameter name -> the row permutation applied (laid back out on export)."""
        self.kv_replicated = False
        """k/v projections are replicated (kv heads do not split over the ranks)."""
        self.meter = None
        """The :class:`~hf_seqpar.core.comm.CollectiveMeter`, when counting."""
        self._configs: list = []
        self._handles: list = []
        self._tp_hooks: list = []
        self._tied = False

    def apply(self, model, plan, groups=()) -> None:
        """Parallelize ``model`` by ``plan`` (in place; every rank must call it).

        Args:
            model: the causal LM.
            plan: the family's :class:`~hf_seqpar.patches.MegatronPlan` for this degree.
            groups: further process groups whose collectives the meter attributes (e.g. ``dp``).

        Raises:
            ValueError, TypeError: see :func:`check_targets` (checked before anything changes).
        """
        check_targets(model, plan)
        tp = self.size
        self.kv_replicated = plan.kv_replicated
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        self._tied = head is not None and head.weight is embed.weight
        before = _hook_keys(model)
        layers = model.get_submodule(plan.layers)
        with torch.no_grad():
            for i, layer in enumerate(layers):
                for pname, sizes in plan.fused.items():
                    perm = _rank_major(sizes, tp)
                    param = layer.get_parameter(pname)
                    param.copy_(param[perm.to(param.device)])  # (rows, in) rows re-laid out rank-major
                    self.relayout[f"{plan.layers}.{i}.{pname}"] = perm
        for layer in layers:
            parallelize_module(layer, self.mesh, plan.layer_plan)
            for attr, value in plan.local_head_attrs.items():
                _set_local_attr(layer.self_attn, attr, value // tp, self._configs)
        parallelize_module(model, self.mesh, plan.model_plan)
        group = self.mesh.get_group()
        with torch.no_grad():  # torch's styles scatter shards from rank 0 but keep each rank's replicas:
            for p in model.parameters():  # take rank 0's replicas too, so all weights agree
                if isinstance(p, DTensor) and all(pl.is_replicate() for pl in p.placements):
                    broadcast_(p.to_local(), group, self.counter)
        if self._tied:
            head.weight = embed.weight
        after = _hook_keys(model)
        self._tp_hooks = [
            (m, d, after[id(m)][d] - before[id(m)][d])
            for m in model.modules()
            for d in _HOOK_DICTS
            if after[id(m)][d] - before[id(m)][d]
        ]
        self._handles.append(model.register_state_dict_post_hook(_FullStateDict(self)))
        if self.counter.enabled:
            self._install_meter(model, layers, [group, *(g for g in groups if g is not None)])

    def undo(self, model) -> None:
        """Restore plain parameters (whole tensors in the checkpoint's layout), hooks and attributes."""
        for handle in self._handles:
            handle.remove()
        for module, dict_name, keys in self._tp_hooks:
            for key in keys:
                getattr(module, dict_name).pop(key, None)
        for module, attr, original in reversed(self._configs):
            setattr(module, attr, original)
        with torch.no_grad():
            for module_name, module in model.named_modules():
                module.__dict__.pop("_distribute_module_applied", None)
                for p_name, p in list(module.named_parameters(recurse=False)):
                    if isinstance(p, DTensor):
                        full = self.full_tensor(f"{module_name}.{p_name}".lstrip("."), p.detach())
                        module.register_parameter(p_name, torch.nn.Parameter(full, requires_grad=p.requires_grad))
        if self._tied:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        self._handles, self._tp_hooks, self._configs, self.relayout, self.meter = [], [], [], {}, None

    def full_tensor(self, name: str, tensor) -> torch.Tensor:
        """The whole tensor of parameter ``name`` (or of its gradient) in the checkpoint's layout
        (a collective for DTensors: call it on every rank)."""
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        perm = self.relayout.get(name)
        return tensor if perm is None else tensor[torch.argsort(perm).to(tensor.device)]

    def _install_meter(self, model, layers, groups) -> None:
        """Count DTensor collectives per layer: module hooks set the layer in forward, tensor hooks
        on each layer's input/output set it in backward (reverse order)."""
        meter = CollectiveMeter(self.counter, {g.group_name: g.size() for g in groups})
        self.meter = meter

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
            self._handles.append(layer.register_forward_pre_hook(layer_pre(i)))
            self._handles.append(layer.register_forward_hook(layer_post(i)))
        self._handles.append(model.register_forward_pre_hook(lambda *_: meter.start()))
        self._handles.append(model.register_forward_hook(lambda *_: meter.stop(), always_call=True))


def check_targets(model, plan) -> None:
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
        module.config = _LocalConfig(module.config, **{attr[len("config.") :]: value})
    else:
        undo.append((module, attr, getattr(module, attr)))
        setattr(module, attr, value)


def full_tensor(model, name: str, tensor) -> torch.Tensor:
    """The whole tensor of parameter ``name`` (or of its gradient) in the checkpoint's layout.

    Args:
        model: the model (``name`` relative to its ``PreTrainedModel``), with or without SP.
        name: parameter name, e.g. ``"model.layers.0.self_attn.qkv_proj.weight"``.
        tensor: the parameter or gradient (a DTensor, or a plain tensor returned as is).

    Returns:
        A plain tensor: ``full_tensor()`` of the DTensor (a collective: call it on every rank),
        with fused rows laid back out (Phi-3).
    """
    state = find_state(model)
    tp = state.strategy.tensor_parallel if state is not None else None
    if tp is None:
        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return tp.full_tensor(name, tensor)


def average_gradients_over_dp(model) -> None:
    """Average every gradient over the data-parallel replicas (``dp`` dimension only), in place.

    What DDP does, for DTensor gradients: their local shards (or partial sums) are averaged over
    the ranks that hold the same shard in other replicas. No-op with one replica or without SP.
    """
    state = find_state(model)
    if state is not None:
        state.strategy.average_gradients_over_dp(model, state.counter)


def counting(model):
    """A context manager that also counts the backward's DTensor collectives of a model enabled
    with ``count_comm=True`` (``with counting(model): loss.backward()``; forwards are counted
    automatically). A no-op for strategies whose collectives are all counted by their hooks.

    Raises:
        RuntimeError: the model is tensor-parallel but was enabled without ``count_comm=True``.
    """
    state = find_state(model)
    return contextlib.nullcontext() if state is None else state.strategy.metering()
