"""Block-attention backends: forward ``(out, lse)`` and backward ``(dq, dk, dv)``.

Every backend takes q ``(B, h_q, S_q, D)``, k/v ``(B, h_kv, S_k, D)`` (grouped-query attention:
``h_q % h_kv == 0``, K/V passed without repetition, and expanded locally only for a kernel that
needs it: :mod:`.gqa`), a softmax ``scale``, ``causal`` (top-left
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

from .gqa import dkv_from_kernel, kv_for_kernel
from .reference import reference_backward, reference_forward

__all__ = ["BACKENDS", "Backend"]

aten = torch.ops.aten


def _additive(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


class Backend:
    """A named pair of block forward/backward functions and what they support."""

    name = "base"
    native_window = False
    supports_mask = True
    devices: tuple[str, ...] = ()
    #: Input dtypes the kernel takes (others are cast to the first of these by the dispatcher).
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

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
            q, k, v, 0.0, causal, attn_mask=_additive(mask, q.dtype), scale=scale
        )
        return out, lse.to(_lse_dtype(q))

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, window, mask):
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.to(q.dtype),
            q,
            k,
            v,
            out.to(q.dtype),
            lse.to(_lse_dtype(q)),
            0.0,
            causal,
            attn_mask=_additive(mask, q.dtype),
            scale=scale,
        )


#: Sequence alignment of the memory-efficient kernel's lse (``kAlignLSE`` in aten's
#: ``_efficient_attention_forward``): its forward returns ``(B, h, ceil(S / 32) * 32)`` and its
#: backward checks that the head and batch strides of the lse it is given are multiples of 8.
EFFICIENT_LSE_ALIGN = 32
#: Elements the last dim of an additive bias is padded to for the memory-efficient kernel (aten's
#: own SDPA pads masks the same way before calling it: its tiles read whole aligned rows).
BIAS_ALIGN = 16
#: Dtypes the CUDA flash and cuDNN kernels take (the memory-efficient kernel also takes fp32).
HALF_DTYPES = (torch.float16, torch.bfloat16)


def efficient_lse_for_backward(lse: torch.Tensor) -> torch.Tensor:
    """The memory-efficient backward's lse: fp32 ``(B, h, S)`` laid out as its forward returns it.

    The kernel indexes the lse with strides that must be multiples of 8 ("LSE is not correctly
    aligned (strideH)"), which a plain contiguous ``(B, h, S)`` tensor violates for most ``S``:
    the values go into a buffer padded to a multiple of :data:`EFFICIENT_LSE_ALIGN`, and the
    returned view keeps the padded strides (the padding itself is never read).
    """
    b, h, s = lse.shape
    padded = -(-s // EFFICIENT_LSE_ALIGN) * EFFICIENT_LSE_ALIGN
    buf = torch.zeros(b, h, padded, dtype=torch.float32, device=lse.device)
    buf[..., :s].copy_(lse)
    return buf[..., :s]


def aligned_bias(mask: torch.Tensor | None, batch: int, heads: int, sq: int, sk: int, dtype) -> torch.Tensor | None:
    """An additive bias ``(B, h, S_q, S_k)`` for the memory-efficient and cuDNN kernels.

    Built from a bool ``mask`` ``(B|1, 1, S_q, S_k)`` (True = attend; None -> None) in a buffer whose
    last dim is padded to a multiple of :data:`BIAS_ALIGN`, so every row the kernel reads starts
    aligned and no tile reads past the allocation; heads are a stride-0 expand (no copy).

    Raises:
        ValueError: ``mask`` does not have the shape the block needs (a wrong shape here would be an
            out-of-bounds read on the GPU, not an exception).
    """
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or tuple(mask.shape[2:]) != (sq, sk):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; the block needs (1 or {batch}, 1, {sq}, {sk})")
    padded = -(-sk // BIAS_ALIGN) * BIAS_ALIGN
    buf = torch.zeros(mask.shape[0], 1, sq, padded, dtype=dtype, device=mask.device)
    bias = buf[..., :sk]
    bias.masked_fill_(~mask, float("-inf"))
    return bias.expand(batch, heads, sq, sk)


def cudnn_lse_for_backward(lse: torch.Tensor) -> torch.Tensor:
    """cuDNN's softmax statistics layout: fp32 ``(B, h, S, 1)``, contiguous."""
    return lse.float().unsqueeze(-1).contiguous()


def _dense_seed(q):
    # dropout is 0, so the kernels never read the RNG state; aten's flash and memory-efficient
    # forwards return 0-dim int64 tensors here, which is what their backward schemas take
    return torch.zeros((), dtype=torch.int64)


def cudnn_seed(q: torch.Tensor) -> torch.Tensor:
    """cuDNN's philox seed/offset: int64 ``(1,)`` on the query's device, as aten's cuDNN forward
    makes them (``at::zeros({1}, query.options().dtype(kLong))``); its backward checks that every
    tensor argument is on the query's device (a CPU seed: "philox_seed is on cpu")."""
    return torch.zeros(1, dtype=torch.int64, device=q.device)


def bshd_layout(t: torch.Tensor) -> torch.Tensor:
    """``(B, h, S, D)`` values over ``(B, S, h, D)`` contiguous storage: the layout aten's
    memory-efficient forward returns its output in.

    Its backward kernel does not read the output's sequence stride from the tensor: it assumes
    ``o_strideM = num_heads * head_dim`` (``o_strideM()`` in aten's ``mem_eff_attention/
    kernel_backward.h``), so an output in any other layout (e.g. the contiguous ``(B, h, S, D)`` of a
    merged ring output) is read at the wrong places: silently wrong gradients, no error.
    """
    return t.transpose(1, 2).contiguous().transpose(1, 2)


class CudaFlashBackend(Backend):
    """``aten._scaled_dot_product_flash_attention`` (no mask; grouped K/V heads taken as they are:
    :data:`~.gqa.GQA`, the backward returns kv-head dk/dv).

    Arguments follow torch's own context-parallel ring (``_context_parallel._attention``): the
    backward gets the *dense* form of the forward's outputs, i.e. ``cum_seq_q``/``cum_seq_k``
    undefined (passed as None; a defined tensor selects aten's varlen path, which wants int32
    offsets), ``max_q``/``max_k`` the sequence lengths, and the lse fp32 ``(B, h, S)`` contiguous.
    """

    name = "cuda_flash"
    supports_mask = False
    devices = ("cuda",)
    dtypes = HALF_DTYPES

    def forward(self, q, k, v, *, scale, causal, window, mask):
        ke, ve = kv_for_kernel(self.name, q, k, v)
        res = aten._scaled_dot_product_flash_attention(q, ke, ve, 0.0, causal, False, scale=scale)
        return res[0], res[1].float()

    @staticmethod
    def backward_args(dout, q, k, v, out, lse, *, scale, causal):
        """The positional arguments of ``aten._scaled_dot_product_flash_attention_backward``
        (K/V as the kernel takes them: :func:`~.gqa.kv_for_kernel`); no device needed, unit-tested
        on CPU."""
        seed = _dense_seed(q)
        return (
            (
                dout.to(q.dtype).contiguous(),
                q,
                k,
                v,
                out.to(q.dtype).contiguous(),
                lse.float().contiguous(),
                None,
                None,
                q.shape[2],
                k.shape[2],
                0.0,
                causal,
                seed,
                seed,
            ),
            {"scale": scale},
        )

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, window, mask):
        ke, ve = kv_for_kernel(self.name, q, k, v)
        args, kwargs = self.backward_args(dout, q, ke, ve, out, lse, scale=scale, causal=causal)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(*args, **kwargs)
        return (dq, *dkv_from_kernel(self.name, dk, dv, k.shape[1]))


class CudaEfficientBackend(Backend):
    """``aten._scaled_dot_product_efficient_attention`` (masks as an aligned additive bias;
    fp32, fp16 and bf16). Its lse is padded along the sequence (:func:`efficient_lse_for_backward`).
    The kernel has one head count for q, k and v (:data:`~.gqa.GQA`): K/V are expanded locally for
    GQA and the ``h_q``-head dk/dv it returns are summed over each group."""

    name = "cuda_efficient"
    devices = ("cuda",)
    dtypes = (torch.float32,) + HALF_DTYPES

    def forward(self, q, k, v, *, scale, causal, window, mask):
        ke, ve = kv_for_kernel(self.name, q, k, v)
        bias = aligned_bias(mask, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.dtype)
        out, lse, _, _ = aten._scaled_dot_product_efficient_attention(q, ke, ve, bias, True, 0.0, causal, scale=scale)
        return out, lse[..., : q.shape[2]].float()  # the lse is padded along the sequence

    @staticmethod
    def backward_args(dout, q, k, v, out, lse, *, scale, causal, mask):
        """Arguments of ``aten._scaled_dot_product_efficient_attention_backward`` (K/V expanded to the
        query heads by the caller: :func:`~.gqa.kv_for_kernel`)."""
        bias = aligned_bias(mask, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.dtype)
        seed = _dense_seed(q)
        # out (and dout, alike) in the forward's own layout: see bshd_layout
        return (
            (
                bshd_layout(dout.to(q.dtype)),
                q,
                k,
                v,
                bias,
                bshd_layout(out.to(q.dtype)),
                efficient_lse_for_backward(lse),
                seed,
                seed,
                0.0,
                [True, True, True, False],
                causal,
            ),
            {"scale": scale},
        )

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, window, mask):
        ke, ve = kv_for_kernel(self.name, q, k, v)
        args, kwargs = self.backward_args(dout, q, ke, ve, out, lse, scale=scale, causal=causal, mask=mask)
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(*args, **kwargs)
        return (dq, *dkv_from_kernel(self.name, dk, dv, k.shape[1]))


class CudnnBackend(Backend):
    """``aten._scaled_dot_product_cudnn_attention`` (fp16/bf16; masks as an aligned additive
    bias; grouped K/V heads taken as they are, kv-head dk/dv: :data:`~.gqa.GQA`). The lse is
    ``(B, h, S, 1)`` on cuDNN's side, ``(B, h, S)`` here. As for flash, the backward gets undefined
    ``cum_seq_q``/``cum_seq_k`` (a defined tensor selects the nested 3-D path: "Q tensor has
    unexpected number of dims")."""

    name = "cuda_cudnn"
    devices = ("cuda",)
    dtypes = HALF_DTYPES

    def forward(self, q, k, v, *, scale, causal, window, mask):
        ke, ve = kv_for_kernel(self.name, q, k, v)
        bias = aligned_bias(mask, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.dtype)
        res = aten._scaled_dot_product_cudnn_attention(q, ke, ve, bias, True, 0.0, causal, False, scale=scale)
        lse = res[1]
        return res[0], (lse.squeeze(-1) if lse.dim() == 4 else lse).float()

    @staticmethod
    def backward_args(dout, q, k, v, out, lse, *, scale, causal, mask):
        """Arguments of ``aten._scaled_dot_product_cudnn_attention_backward`` (K/V as the kernel
        takes them: :func:`~.gqa.kv_for_kernel`; the bias has the query heads)."""
        bias = aligned_bias(mask, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.dtype)
        seed = cudnn_seed(q)
        out = out.to(q.dtype).contiguous()
        # cuDNN wants dO laid out like O
        dout = dout.to(q.dtype).contiguous()
        return (
            (
                dout,
                q,
                k,
                v,
                out,
                cudnn_lse_for_backward(lse),
                seed,
                seed,
                bias,
                None,
                None,
                q.shape[2],
                k.shape[2],
                0.0,
                causal,
            ),
            {"scale": scale},
        )

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, window, mask):
        if q.shape[2] == 1 and k.shape[2] == 1:
            # "cuDNN Frontend error: s_q = s_kv = 1 is not supported"; the gradients depend only on
            # the final out/lse, so the memory-efficient kernel gives this block's exact share
            return CudaEfficientBackend().backward(
                dout, q, k, v, out, lse, scale=scale, causal=causal, window=window, mask=mask
            )
        ke, ve = kv_for_kernel(self.name, q, k, v)
        args, kwargs = self.backward_args(dout, q, ke, ve, out, lse, scale=scale, causal=causal, mask=mask)
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(*args, **kwargs)
        return (dq, *dkv_from_kernel(self.name, dk, dv, k.shape[1]))


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
        out, lse, _ = flash_attn_func(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            0.0,
            scale,
            causal,
            window_size=self._window(window),
            return_attn_probs=True,
        )
        return out.transpose(1, 2), lse.float()

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, window, mask):
        from flash_attn.flash_attn_interface import _flash_attn_backward

        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
        left, right = self._window(window)
        _flash_attn_backward(
            dout.to(q.dtype).transpose(1, 2).contiguous(),
            qt,
            kt,
            vt,
            out.to(q.dtype).transpose(1, 2).contiguous(),
            lse.float().contiguous(),
            dq,
            dk,
            dv,
            0.0,
            scale,
            causal,
            left,
            right,
            0.0,
            None,
            False,
            None,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)

    # ---- variable length (packed documents), flash-attn layout (total_tokens, h, D) ----------

    def varlen_forward(self, q, k, v, cu_seqlens, max_seqlen, *, scale, causal=True, window=None):
        """Attention within each segment of ``cu_seqlens`` (int32 ``(n + 1,)``) over packed
        ``(total, h, D)`` tensors; returns ``(out, lse)`` with lse ``(h, total)`` fp32."""
        from flash_attn import flash_attn_varlen_func

        out, lse, _ = flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            0.0,
            scale,
            causal,
            window_size=self._window(window),
            return_attn_probs=True,
        )
        return out, lse.float()

    def varlen_backward(self, dout, q, k, v, out, lse, cu_seqlens, max_seqlen, *, scale, causal=True, window=None):
        """``(dq, dk, dv)`` of :meth:`varlen_forward` given the final ``out``/``lse``."""
        from flash_attn.flash_attn_interface import _flash_attn_varlen_backward

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        left, right = self._window(window)
        _flash_attn_varlen_backward(
            dout.contiguous(),
            q,
            k,
            v,
            out,
            lse.contiguous(),
            dq,
            dk,
            dv,
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            0.0,
            scale,
            causal,
            left,
            right,
            0.0,
            None,
            False,
            None,
        )
        return dq, dk, dv


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        ReferenceBackend(),
        TorchCPUBackend(),
        CudaFlashBackend(),
        CudaEfficientBackend(),
        CudnnBackend(),
        FlashAttnBackend(),
    )
}
