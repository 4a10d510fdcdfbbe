"""Attention kernels with log-sum-exp, installed as ``hf_seqpar.kernels``.

One block-attention interface (:func:`block_forward`, :func:`block_backward`) over several
backends (:mod:`.backends`), chosen automatically by device and by whether a mask is needed,
or by name; the lse merge (:func:`merge_into`); and the float64 reference. Knows nothing of
transformers or process groups.
"""

from __future__ import annotations

import importlib.machinery as _machinery
import os as _os
import sys as _sys


def _installed_kernels():
    """The spec of an installed top-level ``kernels`` package other than this directory, or None."""
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    path = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != root]
    return _machinery.PathFinder.find_spec("kernels", path)


# This directory is ``hf_seqpar.kernels``. It is importable as a top-level ``kernels`` only when the
# repository root is on sys.path (``python -m``/``-c`` run from it), where it would shadow Hugging
# Face's ``kernels`` package, which transformers >= 5.25 imports when it is installed. Imported
# under that name, this module becomes the installed package (its ``__init__`` run here, with its
# own spec and path) and defines nothing of hf_seqpar's.
_SHADOWING = __name__ == "kernels" and (_spec := _installed_kernels()) is not None
if _SHADOWING:
    __spec__, __loader__, __file__ = _spec, _spec.loader, _spec.origin
    __path__ = list(_spec.submodule_search_locations or [])
    _spec.loader.exec_module(_sys.modules[__name__])
else:
    import torch

    from .backends import BACKENDS, Backend
    from .merge import merge_into
    from .reference import allowed_mask, reference_attention, reference_backward, reference_forward
    from .speed import FALLBACK, device_order

    __all__ = [
        "BACKENDS",
        "compute_dtype",
        "block_forward",
        "block_backward",
        "select_backend",
        "backend_named",
        "merge_into",
        "reference_attention",
        "reference_forward",
        "reference_backward",
    ]

    #: Preference order per device: the first available backend that can honour the call wins. On CUDA
    #: the order comes from the per-device speed table (:func:`.speed.device_order`); this is the order
    #: for a device the table does not know.
    PREFERENCE = {"cpu": ("torch_cpu",), "cuda": FALLBACK}

    def preference(device: torch.device, needs_mask: bool) -> tuple[str, ...]:
        """The backend order for blocks on ``device`` (CUDA: measured per device, :mod:`.speed`)."""
        if device.type == "cuda":
            return device_order(device, needs_mask)
        return PREFERENCE.get(device.type, ())

    def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
        """The dtype attention computes in, for inputs that may differ in dtype.

        Under autocast (``torch.autocast`` or Accelerate's ``mixed_precision``) it is the autocast
        dtype, as for the model's own SDPA call (RoPE returns fp32 q/k while v is bf16 there);
        otherwise the promoted dtype of the inputs. float64 inputs are never lowered (autocast leaves
        them alone too). The lse and every accumulator stay fp32 whatever this returns.
        """
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        device_type = tensors[0].device.type
        if dtype != torch.float64 and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return dtype

    def backend_named(name: str | Backend | None) -> Backend | None:
        """The backend called ``name`` (a :class:`Backend` or None is returned as is): resolve a name
        once, then pass the object to every block call.

        Raises:
            ValueError: unknown name.
        """
        if name is None or isinstance(name, Backend):
            return name
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; valid: {sorted(BACKENDS)}")
        return BACKENDS[name]

    def select_backend(
        device: torch.device, needs_mask: bool, name: str | Backend | None = None, dtype: torch.dtype | None = None
    ) -> Backend:
        """The backend for a block on ``device``.

        Args:
            device: the tensors' device.
            needs_mask: whether the block needs an arbitrary mask.
            name: a backend to force: a name of ``BACKENDS``, or the :class:`Backend` itself (from
                :func:`backend_named`, so that the name is not looked up at every block).
            dtype: the compute dtype (backends that do not take it are skipped: e.g. the CUDA flash
                and cuDNN kernels take only fp16/bf16, so fp32 blocks go to the memory-efficient one).

        Raises:
            ValueError: unknown name, or a forced backend that cannot run this block.
        """
        if name is not None:
            backend = backend_named(name)
            name = backend.name
            if device.type not in backend.devices or not backend.available():
                raise ValueError(
                    f"attention backend {name!r} cannot run on {device.type} here "
                    f"(devices {backend.devices}, available={backend.available()})"
                )
            if needs_mask and not backend.supports_mask:
                raise ValueError(
                    f"attention backend {name!r} takes no masks, but this block needs one "
                    "(padding, documents or a window); choose a backend that does, or leave it automatic"
                )
            if dtype is not None and dtype not in backend.dtypes:
                raise ValueError(
                    f"attention backend {name!r} computes in {[str(d) for d in backend.dtypes]}, not "
                    f"{dtype}; train in bf16 (weights or autocast) or leave the backend automatic"
                )
            return backend
        for candidate in preference(device, needs_mask):
            backend = BACKENDS[candidate]
            if (
                backend.available()
                and (backend.supports_mask or not needs_mask)
                and (dtype is None or dtype in backend.dtypes)
            ):
                return backend
        raise ValueError(
            f"no attention backend for device {device.type!r} and dtype {dtype}; valid: {sorted(BACKENDS)}"
        )

    def _prepare(q, k, v, causal, window, mask, backend_name):
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"q, k, v must be (B, h, S, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
        if causal and q.shape[2] != k.shape[2]:
            raise ValueError(f"causal blocks must be square (top-left alignment), got {q.shape[2]} x {k.shape[2]}")
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"query heads {q.shape[1]} are not a multiple of kv heads {k.shape[1]}")
        if mask is not None and (
            mask.dim() != 4
            or mask.shape[1] != 1
            or mask.shape[0] not in (1, q.shape[0])
            or tuple(mask.shape[2:]) != (q.shape[2], k.shape[2])
        ):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}; this block needs "
                f"(1 or {q.shape[0]}, 1, {q.shape[2]}, {k.shape[2]})"
            )
        dtype = compute_dtype(q, k, v)
        needs_mask = mask is not None
        backend = select_backend(
            q.device, needs_mask or (window is not None and not _native(backend_name)), backend_name, dtype
        )
        if window is not None and not backend.native_window:
            mask, window = allowed_mask(q.shape[2], k.shape[2], causal, window, mask, q.device), None
        return backend, window, mask, dtype

    def _native(name):
        if isinstance(name, Backend):
            return name.native_window
        return name is not None and BACKENDS.get(name, Backend()).native_window

    def block_forward(
        q,
        k,
        v,
        *,
        scale: float,
        causal: bool = False,
        window: int | None = None,
        mask: torch.Tensor | None = None,
        backend: str | None = None,
    ):
        """Attention of a block of queries over a block of keys, with its log-sum-exp.

        Args:
            q: ``(B, h_q, S_q, D)``.
            k: ``(B, h_kv, S_k, D)`` (not repeated for GQA).
            v: like ``k``.
            scale: softmax scale.
            causal: top-left aligned causal mask (``S_q == S_k``).
            window: sliding window, keys with ``k > q - window``.
            mask: bool ``(B|1, 1, S_q, S_k)``, True = attend.
            backend: force a backend (a name or a :class:`Backend`).

        Inputs of different dtypes are cast to :func:`compute_dtype` (the autocast dtype under
        autocast).

        Returns:
            ``(out, lse)``: ``(B, h_q, S_q, D)`` in the compute dtype and ``(B, h_q, S_q)`` in fp32 (fp64 for
            fp64 inputs); rows with no
            allowed key have ``out = 0`` and ``lse = -inf``.
        """
        impl, window, mask, dtype = _prepare(q, k, v, causal, window, mask, backend)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        out, lse = impl.forward(q, k, v, scale=scale, causal=causal, window=window, mask=mask)
        if mask is not None:
            empty = ~mask.any(-1)  # (B|1, 1, S_q): rows without any key
            if bool(empty.any()):
                lse = lse.masked_fill(empty, float("-inf"))
                out = out.masked_fill(empty.unsqueeze(-1), 0.0)
        return out, lse

    def block_backward(
        dout,
        q,
        k,
        v,
        out,
        lse,
        *,
        scale: float,
        causal: bool = False,
        window: int | None = None,
        mask: torch.Tensor | None = None,
        backend: str | None = None,
    ):
        """Gradients of one block given the rows' *final* output and log-sum-exp.

        With ``out``/``lse`` of the complete attention of each row (all key blocks merged), the
        flash backward of one key block yields that block's exact share of dq and its exact dk, dv.

        Args:
            dout: ``(B, h_q, S_q, D)`` gradient of the final output.
            q, k, v: as for :func:`block_forward`.
            out: ``(B, h_q, S_q, D)`` final output; ``lse``: ``(B, h_q, S_q)`` final lse
                (``-inf`` rows get zero gradients).
            scale, causal, window, mask, backend: as for :func:`block_forward`.

        Returns:
            ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v`` and in their dtypes.
        """
        impl, window, mask, dtype = _prepare(q, k, v, causal, window, mask, backend)
        in_dtypes = (q.dtype, k.dtype, v.dtype)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)  # P = exp(s - inf) = 0
        grads = impl.backward(dout, q, k, v, out, lse, scale=scale, causal=causal, window=window, mask=mask)
        return tuple(g.to(d) for g, d in zip(grads, in_dtypes))
