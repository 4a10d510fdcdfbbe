"""Block-attention backends: forward ``(out, lse)`` and backward ``(dq, dk, dv)``.

Every backend takes q ``(B, h_q, S_q, D)``, k/v ``(B, h_kv, S_k, D)`` (grouped-query attention:
``h_q % h_kv == 0``, K/V passed without repetition), a softmax ``scale``, ``causal`` (top-left
aligned, only with ``S_q == S_k``), an optional ``window`` (keys ``k > q - window``) and an
optional bool ``mask`` ``(B|1, 1, S_q, S_k)`` (True = attend). The dispatcher in ``__init__``
folds windows into masks for backends without native windows and fixes up rows with no allowed
key (``lse = -inf``, ``out = 0``).

CPU: ``torch_cpu`` (aten's CPU flash kernel). CUDA: ``cuda_flash``, ``cuda_efficient`` and
``cuda_cudnn`` (aten SDPA ops; efficient and cuDNN take masks as an additive bias) and
``flash_attn`` (the flash-attn package, when installed; dense, plus ``varlen_forward`` /
``varlen_backward`` for packed documents). ``reference``: float64 oracle for tests. The CUDA backends are written
for real use but are exercised only where a GPU is present (tests marked ``gpu``).
"""

from __future__ import annotations

import importlib.util

import torch

from .reference import reference_backward, reference_forward

__all__ = ["BACKENDS", "Backend"]

aten = torch.ops.aten


def _additive(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _expand_kv(q, k, v):
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return k, v
    # (B, h_kv, S, D) -> (B, h_q, S, D), local only (never before communication)
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _fold_kv(grad, h_kv):
    # (B, h_q, S, D) -> (B, h_kv, S, D): sum the query heads of each group
    return grad.unflatten(1, (h_kv, grad.shape[1] // h_kv)).sum(2)


class Backend:
    """A named pair of block forward/backward functions and what they support."""

    name = "base"
    native_window = False
    supports_mask = True
    devices: tuple[str, ...] = ()

    def available(self) -> bool:
        return True

    def forward(self, q, k, v, *, scale, causal, window, mask):
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, window, mask):
        raise NotImplementedError


class ReferenceBackend(Backend):
    name = "reference"
    native_window = True
    devices = ("cpu", "cuda")

    def forward(self, q, k, v, *, scale, causal, window, mask):
        out, lse = reference_forward(q, k, v, scale=scale, causal=causal, window=window, mask=mask)
        return out.to(q.dtype), lse.to(_lse_dtype(q))

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, window, mask):
        grads = reference_backward(dout, q, k, v, out, lse, scale=scale, causal=causal, window=window, mask=mask)
        return tuple(g.to(q.dtype) for g in grads)


class TorchCPUBackend(Backend):
    """``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward (GQA native)."""

    name = "torch_cpu"
    devices = ("cpu",)

    def forward(self, q, k, v, *, scale, causal, window, mask):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=_additive(mask, q.dtype), scale=scale)
        return out, lse.to(_lse_dtype(q))

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, window, mask):
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.to(q.dtype), q, k, v, out.to(q.dtype), lse.to(_lse_dtype(q)), 0.0, causal,
            attn_mask=_additive(mask, q.dtype),
            scale=scale)


class CudaFlashBackend(Backend):
    """``aten._scaled_dot_product_flash_attention`` (no mask; K/V expanded locally for GQA)."""

    name = "cuda_flash"
    supports_mask = False
    devices = ("cuda",)

    def forward(self, q, k, v, *, scale, causal, window, mask):
        ke, ve = _expand_kv(q, k, v)
        res = aten._scaled_dot_product_flash_attention(q, ke, ve, 0.0, causal, False, scale=scale)
        return res[0], res[1].float()

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, window, mask):
        ke, ve = _expand_kv(q, k, v)
        empty = torch.empty(0, device=q.device, dtype=torch.int64)
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            dout.to(q.dtype), q, ke, ve, out.to(q.dtype), lse.float(), empty, empty, q.shape[2], k.shape[2], 0.0,
            causal, seed, seed, scale=scale)
        return dq, _fold_kv(dk, k.shape[1]), _fold_kv(dv, k.shape[1])


class CudaEfficientBackend(Backend):
    """``aten._scaled_dot_product_efficient_attention`` (masks as an additive bias)."""

    name = "cuda_efficient"
    devices = ("cuda",)

    def _bias(self, mask, q, sk):
        if mask is None:
            return None
        return _additive(mask, q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], sk)

    def forward(self, q, k, v, *, scale, causal, window, mask):
        ke, ve = _expand_kv(q, k, v)
        out, lse, _, _ = aten._scaled_dot_product_efficient_attention(
            q, ke, ve, self._bias(mask, q, k.shape[2]), True, 0.0, causal, scale=scale)
        return out, lse[..., : q.shape[2]].float()  # lse may be padded along the sequence

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, window, mask):
        ke, ve = _expand_kv(q, k, v)
        bias = self._bias(mask, q, k.shape[2])
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout.to(q.dtype), q, ke, ve, bias, out.to(q.dtype), lse.float().contiguous(), seed, seed, 0.0,
            [True, True, True, False], causal, scale=scale)
        return dq, _fold_kv(dk, k.shape[1]), _fold_kv(dv, k.shape[1])


class CudnnBackend(Backend):
    """``aten._scaled_dot_product_cudnn_attention`` (masks as an additive bias; K/V expanded
    locally for GQA). cuDNN returns the lse as ``(B, h, S, 1)`` on some versions: squeezed here."""

    name = "cuda_cudnn"
    devices = ("cuda",)

    def forward(self, q, k, v, *, scale, causal, window, mask):
        ke, ve = _expand_kv(q, k, v)
        res = aten._scaled_dot_product_cudnn_attention(q, ke, ve, CudaEfficientBackend()._bias(mask, q, k.shape[2]),
                                                       True, 0.0, causal, False, scale=scale)
        lse = res[1]
        return res[0], (lse.squeeze(-1) if lse.dim() == 4 else lse).float()

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, window, mask):
        ke, ve = _expand_kv(q, k, v)
        bias = CudaEfficientBackend()._bias(mask, q, k.shape[2])
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        empty = torch.empty(0, device=q.device, dtype=torch.int64)
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            dout.to(q.dtype), q, ke, ve, out.to(q.dtype), lse.float().unsqueeze(-1).contiguous(), seed, seed,
            bias, empty, empty, q.shape[2], k.shape[2], 0.0, causal, scale=scale)
        return dq, _fold_kv(dk, k.shape[1]), _fold_kv(dv, k.shape[1])


class FlashAttnBackend(Backend):
    """The flash-attn package (dense); native GQA and sliding windows, no masks.

    Forward uses the public ``flash_attn_func(..., return_attn_probs=True)`` for the lse; the
    package exposes its backward only as ``flash_attn_interface._flash_attn_backward``, which is
    called (never replaced).
    """

    name = "flash_attn"
    supports_mask = False
    native_window = True
    devices = ("cuda",)

    def available(self) -> bool:
        return importlib.util.find_spec("flash_attn") is not None

    @staticmethod
    def _window(window):
        return (window - 1, 0) if window is not None else (-1, -1)

    def forward(self, q, k, v, *, scale, causal, window, mask):
        from flash_attn import flash_attn_func

        # flash-attn layout is (B, S, h, D)
        out, lse, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, scale,
                                      causal, window_size=self._window(window), return_attn_probs=True)
        return out.transpose(1, 2), lse.float()

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, window, mask):
        from flash_attn.flash_attn_interface import _flash_attn_backward

        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
        left, right = self._window(window)
        _flash_attn_backward(dout.to(q.dtype).transpose(1, 2).contiguous(), qt, kt, vt,
                             out.to(q.dtype).transpose(1, 2).contiguous(), lse.float().contiguous(), dq, dk, dv,
                             0.0, scale, causal, left, right, 0.0, None, False, None)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


    # ---- variable length (packed documents), flash-attn layout (total_tokens, h, D) ----------

    def varlen_forward(self, q, k, v, cu_seqlens, max_seqlen, *, scale, causal=True, window=None):
        """Attention within each segment of ``cu_seqlens`` (int32 ``(n + 1,)``) over packed
        ``(total, h, D)`` tensors; returns ``(out, lse)`` with lse ``(h, total)`` fp32."""
        from flash_attn import flash_attn_varlen_func

        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, scale,
                                             causal, window_size=self._window(window), return_attn_probs=True)
        return out, lse.float()

    def varlen_backward(self, dout, q, k, v, out, lse, cu_seqlens, max_seqlen, *, scale, causal=True, window=None):
        """``(dq, dk, dv)`` of :meth:`varlen_forward` given the final ``out``/``lse``."""
        from flash_attn.flash_attn_interface import _flash_attn_varlen_backward

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        left, right = self._window(window)
        _flash_attn_varlen_backward(dout.contiguous(), q, k, v, out, lse.contiguous(), dq, dk, dv, cu_seqlens,
                                    cu_seqlens, max_seqlen, max_seqlen, 0.0, scale, causal, left, right, 0.0, None,
                                    False, None)
        return dq, dk, dv


BACKENDS: dict[str, Backend] = {
    b.name: b for b in (ReferenceBackend(), TorchCPUBackend(), CudaFlashBackend(), CudaEfficientBackend(),
                        CudnnBackend(), FlashAttnBackend())
}
