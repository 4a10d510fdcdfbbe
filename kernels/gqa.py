"""Which attention kernels take K/V with fewer heads than Q (grouped-query attention), and how.

One row per backend of :mod:`.backends`: whether its forward and backward take ``k``/``v`` of
``h_kv < h_q`` heads as they are, what shape of dk/dv its backward returns, and what the kernel
allocates for the group reduction. The backends read :data:`GQA` to decide whether to expand K/V
(:func:`kv_for_kernel`) and whether to sum grouped gradients (:func:`dkv_from_kernel`); the memory
model (``hf_seqpar.tools.memmodel``) reads the same rows for the CUDA attention backward term.

Sources (read for this table; "stored" = the pytorch/pytorch file as stored by the project's
source index at the commit named, "2.13 wheel" = the headers the CPU wheel here installs under
``torch/include``):

- ``cuda_flash`` (``aten._scaled_dot_product_flash_attention`` / ``_backward``, which call
  ``_flash_attention_forward/backward`` -> ``FLASH_NAMESPACE::mha_fwd/mha_bwd``): the SDPA wrapper
  transposes to ``(B, S, h, D)`` and checks no head counts; ``mha_fwd``/``mha_bwd`` check
  ``num_heads % num_heads_k == 0`` ("Number of heads in key/value must divide number of heads in
  query") and take ``k``/``v`` as ``batch x seqlen_k x num_heads_k x head_size`` (2.13 wheel:
  ``flash_api.h``; stored ``flash_api.cpp`` at 03b7c19d, whose signatures match the 2.13 header).
  ``mha_bwd`` with ``num_heads_k != num_heads`` allocates ``dk_expanded``/``dv_expanded`` of
  ``(B, S_k, h_q, D)`` in the input dtype, runs the kernel into them and ``at::sum_out``\\ s the
  groups into ``dk``/``dv`` of ``(B, S_k, h_kv, D)``: the op returns kv-head gradients, and the
  kernel itself holds the expanded ones (plus its fp32 ``dq_accum`` of
  ``(B, round128(S_q), h_q, round32(D))``) while it runs. torch's own SDPA dispatcher marks flash
  as GQA-capable (``check_batch_size_and_num_heads_dense<true /*supports GQA*/>`` in
  ``sdp_utils.cpp``). Not counted here (the layout, not the heads): ``_flash_attention_backward``
  (stored ``attention_backward.cu``) calls ``grad_out.contiguous()`` and ``out.contiguous()`` on the
  ``(B, S, h, D)`` views it is given, a copy each when out/dout are ``(B, h, S, D)``-contiguous.
- ``cuda_cudnn`` (``aten._scaled_dot_product_cudnn_attention`` / ``_backward`` ->
  ``_cudnn_attention_forward/backward`` -> ``run_cudnn_SDP_fprop/bprop`` in ``cudnn/MHA.cpp``):
  the dense path takes ``num_heads`` from the query only and builds the cuDNN graph's K and V
  tensors from ``k.sizes()``/``v.sizes()`` (stored ``MHA.cpp``); the backward allocates
  ``dk = at::empty_like(key)``, ``dv = at::empty_like(value)`` (stored ``attention_backward.cu``,
  the version with ``_cudnn_attention_backward``): kv-head gradients, the group reduction done
  inside cuDNN. ``sdp_utils.cpp`` gates dense cuDNN with
  ``check_batch_size_and_num_heads_dense<true /*enable_gqa*/, false /*requires_same_num_heads*/>``
  (present from torch 2.8 in the sources read).
- ``cuda_efficient`` (``aten._scaled_dot_product_efficient_attention`` / ``_backward`` ->
  ``_efficient_attention_forward/backward``): both check ``query.size(2) == key.size(2)`` and
  ``== value.size(2)`` ("Num heads"), and the CUTLASS kernel's ``Params`` have one ``num_heads``
  for q, k, v and the gradients (2.13 wheel: ``mem_eff_attention/kernel_forward.h`` and
  ``kernel_backward.h``): K/V must be expanded to the query heads, and its dk/dv come back with
  ``h_q`` heads (summed over each group here).
- ``flash_attn`` (the flash-attn package): native GQA forward and backward (``k``/``v`` of
  ``nheads_k``); the caller passes dk/dv buffers of kv-head shape.
- ``torch_cpu`` (``aten._scaled_dot_product_flash_attention_for_cpu``): native GQA, kv-head
  gradients (measured on CPU by this project's tests).

Not established from sources for torch 2.11 specifically (the GPU machine's torch): the
2.11 kernel sources were not among those read. ``tests/test_gpu.py``'s GQA check compares the
native and the expanded calls on the GPU's own torch; a backend whose native call fails there is
a row to change here (``forward_native=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GQA", "KernelGQA", "kv_for_kernel", "dkv_from_kernel", "expand_kv", "fold_kv"]


@dataclass(frozen=True)
class KernelGQA:
    """How one attention kernel handles grouped K/V heads."""

    native: bool
    """The forward and backward take ``k``/``v`` with their own ``h_kv`` heads (no expansion)."""
    dkv_heads: str
    """Heads of the dk/dv the backward op returns for the K/V it was given: ``"kv"`` (``h_kv``,
    nothing to sum) or ``"q"`` (``h_q``: K/V were expanded, the caller sums each group)."""
    kernel_expanded_dkv: bool
    """While the backward runs, the op itself holds dk/dv expanded to ``h_q`` heads in the input
    dtype (flash's ``dk_expanded``/``dv_expanded``), whatever it returns."""
    fp32_dq_accum: bool
    """The backward allocates its own fp32 dq accumulator over the block's queries (``h_q`` heads)."""
    source: str
    """Where the facts come from (file and function), for the table in the docs."""


#: The table (see the module docstring for the sources). ``reference`` is the float64 oracle.
GQA: dict[str, KernelGQA] = {
    "cuda_flash": KernelGQA(
        native=True,
        dkv_heads="kv",
        kernel_expanded_dkv=True,
        fp32_dq_accum=True,
        source="flash_api.cpp mha_fwd/mha_bwd (num_heads % num_heads_k; dk_expanded + sum_out)",
    ),
    "cuda_cudnn": KernelGQA(
        native=True,
        dkv_heads="kv",
        kernel_expanded_dkv=False,
        fp32_dq_accum=True,
        source="cudnn/MHA.cpp run_cudnn_SDP_fprop/bprop (K/V dims from k/v; dk = empty_like(key)); "
        "its workspace (sized by cuDNN) was not read: counted like flash's fp32 dq accumulator",
    ),
    "cuda_efficient": KernelGQA(
        native=False,
        dkv_heads="q",
        kernel_expanded_dkv=False,
        fp32_dq_accum=False,
        source="attention.cu / attention_backward.cu _efficient_attention_* (query.size(2) == key.size(2))",
    ),
    "flash_attn": KernelGQA(
        native=True,
        dkv_heads="kv",
        kernel_expanded_dkv=True,
        fp32_dq_accum=True,
        source="flash-attn flash_attn_func / _flash_attn_backward (nheads_k)",
    ),
    "torch_cpu": KernelGQA(
        native=True,
        dkv_heads="kv",
        kernel_expanded_dkv=False,
        fp32_dq_accum=False,
        source="_scaled_dot_product_flash_attention_for_cpu (measured: tests)",
    ),
    "reference": KernelGQA(
        native=True, dkv_heads="kv", kernel_expanded_dkv=False, fp32_dq_accum=False, source="float64"
    ),
}


def expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """K/V repeated to the query heads: ``(B, h_kv, S, D) -> (B, h_q, S, D)`` (head ``i`` of q sees
    kv head ``i // (h_q / h_kv)``, as transformers' ``repeat_kv``); local only, never before
    communication."""
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def fold_kv(grad: torch.Tensor, h_kv: int) -> torch.Tensor:
    """Gradients of expanded K or V summed over each group: ``(B, h_q, S, D) -> (B, h_kv, S, D)``."""
    if grad.shape[1] == h_kv:
        return grad
    # (B, h_q, S, D) -> (B, h_kv, h_q / h_kv, S, D) -> sum over the group
    return grad.unflatten(1, (h_kv, grad.shape[1] // h_kv)).sum(2)


def kv_for_kernel(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The K/V to hand kernel ``name``: as they are where it takes grouped heads, else expanded."""
    return (k, v) if GQA[name].native else expand_kv(q, k, v)


def dkv_from_kernel(name: str, dk: torch.Tensor, dv: torch.Tensor, h_kv: int):
    """dk/dv of ``h_kv`` heads from what kernel ``name``'s backward returned.

    Raises:
        ValueError: the kernel returned a head count the table does not say it returns (a kernel
            whose behaviour changed: the table needs updating).
    """
    expected = h_kv if GQA[name].dkv_heads == "kv" else None
    if expected is not None and dk.shape[1] != h_kv:
        raise ValueError(
            f"attention backend {name!r} returned dk with {dk.shape[1]} heads, not the {h_kv} kv heads "
            "kernels/gqa.py says it returns; update the backend's row there"
        )
    return fold_kv(dk, h_kv), fold_kv(dv, h_kv)
