"""An RMSNorm that saves its input and the fp32 per-token ``rstd`` instead of an fp32 copy.

transformers' Llama-style RMSNorm (``LlamaRMSNorm.forward``)::

    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    n = x32 * torch.rsqrt(variance + eps)
    return weight * n.to(x.dtype)

leaves autograd holding the fp32 copy ``x32`` (``4 h`` bytes per token, saved by ``pow`` and by the
multiplication), ``rsqrt`` (4 B) and ``n.to(x.dtype)`` (``e h``, saved for the weight's gradient),
besides the output the next linear saves. :class:`RMSNormFunction` computes the same forward with
the same operations (so the same numbers) and saves only ``x`` (in its own dtype; in a checkpointed
layer the first norm's input is the layer input the checkpoint keeps anyway) and ``rstd``; its
backward recomputes ``n`` and applies, in the same order and dtypes, the derivatives autograd applies
to the forward above (``rsqrt``: ``-0.5 g r^3``; ``mean``: ``g / h``; ``pow(2)``: ``2 g x``;
``mul``: products, the weight's reduced over tokens; each ``to``: the gradient cast back), token
chunk by token chunk so that no ``4 h`` per-token fp32 temporary spans the whole sequence. Per token
and norm, in bf16 at ``h = 4096``: 32 KB saved before, 16 KB after (8 KB for the first norm of a
checkpointed layer).

Which norms: a table of the transformers classes whose ``forward`` is exactly the one above
(:data:`LLAMA_STYLE_NORMS`; ``tests/test_lean_norm.py`` compares their source with Llama's). Others
(Gemma's ``(1 + w)`` computed in fp32, Olmo2's ``(w * n).to(dtype)``, Cohere's LayerNorm, ...) are
left untouched. :func:`install_lean_norms` sets an instance ``forward`` on each such module of a
model (the class is untouched) and :func:`remove_lean_norms` deletes it again; the plugin's
``lean_norms`` (on by default) installs it with the other memory features
(:func:`hf_seqpar.core.memory.install_memory_features`, undone by ``remove_memory_features``).
"""

from __future__ import annotations

import types

import torch

__all__ = [
    "LLAMA_STYLE_NORMS",
    "RMSNormFunction",
    "rms_norm",
    "install_lean_norms",
    "remove_lean_norms",
    "lean_norms_of",
    "lean_forward",
]

#: transformers RMSNorm classes whose forward is Llama's, operation for operation.
LLAMA_STYLE_NORMS = (
    "LlamaRMSNorm",
    "MistralRMSNorm",
    "MixtralRMSNorm",
    "Qwen2RMSNorm",
    "Qwen2MoeRMSNorm",
    "Qwen3RMSNorm",
    "Qwen3MoeRMSNorm",
    "Phi3RMSNorm",
    "GraniteRMSNorm",
)

#: Tokens per chunk of the backward's fp32 temporaries (a few ``chunk x h`` fp32 tensors at a time).
BACKWARD_CHUNK = 2048

_MARK = "_hf_seqpar_lean_norms"


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)``, saving ``x`` and fp32 ``rstd``."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        rstd = torch.rsqrt(variance + eps)
        out = weight * (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_w = None
        if need_w:
            n = (x.to(torch.float32) * rstd).to(x.dtype)
            # mul's weight gradient: the product, summed over the broadcast (token) dims, then its dtype
            lead = tuple(range(grad.dim() - weight.dim()))
            grad_w = (grad * n).sum(lead).to(weight.dtype)
            del n
        grad_x = None
        if need_x:
            h = x.shape[-1]
            grad_x = torch.empty_like(x)
            # (..., h) -> (tokens, h): every operation below is per token, so chunks change nothing
            xs, gs, rs, out = x.reshape(-1, h), grad.reshape(-1, h), rstd.reshape(-1, 1), grad_x.view(-1, h)
            for s in range(0, xs.shape[0], BACKWARD_CHUNK):
                x32, r = xs[s : s + BACKWARD_CHUNK].to(torch.float32), rs[s : s + BACKWARD_CHUNK]
                g_n = (gs[s : s + BACKWARD_CHUNK] * weight).to(x.dtype).to(torch.float32)  # mul, then to(dtype)
                g_r = (g_n * x32).sum(-1, keepdim=True)  # x32 * rstd: rstd's share
                g_var = -0.5 * g_r * r.pow(3)  # rsqrt
                g_pow = g_var.expand_as(x32) / h  # mean
                out[s : s + BACKWARD_CHUNK] = (g_n * r + g_pow * (2 * x32)).to(x.dtype)  # mul + pow(2), to(float32)
        return grad_x, grad_w, None


def llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` written out, operation for operation (differentiable by autograd)."""
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``n``, what Llama's norm multiplies by its weight: ``(x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)``."""
    x32 = x.to(torch.float32)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def final_norm(model):
    """The base model's final norm (``model.<base>.norm``) when it is Llama-style, else None: the one the
    chunked loss can compute itself per chunk (:class:`hf_seqpar.core.memory.ChunkedLMHeadCrossEntropy`)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    m = getattr(base, "norm", None)
    return m if isinstance(m, torch.nn.Module) and m in lean_norms_of(m) else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm of ``x`` (``(..., h)``) with ``weight`` (``(h,)``), saving ``x`` and ``rstd``."""
    return RMSNormFunction.apply(x, weight, eps)


def lean_forward(self, hidden_states):
    """The instance ``forward`` of a Llama-style RMSNorm module (``self.weight``, ``self.variance_epsilon``)."""
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def lean_norms_of(model) -> list:
    """The modules of ``model`` that :func:`install_lean_norms` would change (Llama-style RMSNorms)."""
    return [
        m
        for m in model.modules()
        if type(m).__name__ in LLAMA_STYLE_NORMS
        and isinstance(getattr(m, "weight", None), torch.Tensor)
        and hasattr(m, "variance_epsilon")
    ]


def install_lean_norms(model) -> int:
    """Give every Llama-style RMSNorm of ``model`` the lean forward (an instance attribute; reversible).

    Returns:
        How many norms were changed (0 for a family not in :data:`LLAMA_STYLE_NORMS`).
    """
    remove_lean_norms(model)
    norms = lean_norms_of(model)
    for m in norms:
        m.forward = types.MethodType(lean_forward, m)
    setattr(model, _MARK, norms)
    return len(norms)


def remove_lean_norms(model) -> None:
    """Undo :func:`install_lean_norms`."""
    for m in getattr(model, _MARK, []):
        m.__dict__.pop("forward", None)
    model.__dict__.pop(_MARK, None)
