"""Model FLOPs utilisation: the model's training FLOPs per second over the devices' dense peak.

``MFU = (6 P T + A) / (t x peak x ranks)`` for one step of ``T`` tokens taking ``t`` seconds on
``ranks`` devices: ``P`` parameters (``6 P T``: forward ``2 P T``, backward ``4 P T``), ``A`` the
attention FLOPs of the step (:func:`hf_seqpar.tools.memmodel.attention_flops` with a backward of
twice the forward). Recomputation is not counted (neither the checkpointed layers' second
forward nor the scores flash attention recomputes in its backward): MFU counts the FLOPs the model
needs, not those the hardware ran. The peak is the device's dense bf16 (or fp16) tensor-core
TFLOP/s (no sparsity), from :data:`PEAK_TFLOPS` by device name, or given.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_seqpar.core.shape import ModelShape

from .memmodel import attention_flops

__all__ = ["PEAK_TFLOPS", "peak_tflops", "model_flops", "Utilisation", "utilisation", "describe"]

#: Dense bf16 tensor-core peak TFLOP/s by a part of the name ``torch.cuda.get_device_name`` gives
#: (first match wins: the more specific names come first). Vendors' data-sheet figures, no sparsity.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device by name, or None for a device not in :data:`PEAK_TFLOPS`."""
    for part, peak in PEAK_TFLOPS:
        if part in device_name:
            return peak
    return None


def model_flops(shape: ModelShape, seq_len: int, batch: int = 1) -> float:
    """Training FLOPs of one step of ``batch`` causal rows of ``seq_len`` tokens (all ranks together):
    ``6 P B S`` plus the attention's forward and backward without recomputation."""
    attention = attention_flops(shape, seq_len, 1, batch, checkpointing=False, backward=2.0)
    return 6 * shape.params * batch * seq_len + attention


@dataclass(frozen=True)
class Utilisation:
    """What one step's speed means."""

    tokens_per_s_per_device: float
    """Tokens of the step per second per device."""
    model_tflops_per_device: float
    """Model TFLOP/s per device (:func:`model_flops` / step time / devices)."""
    peak_tflops: float | None
    """The peak used (None: unknown device and none given)."""
    device: str
    """The device's name as given."""

    @property
    def mfu(self) -> float | None:
        """Model FLOPs utilisation (a fraction), None without a peak."""
        return self.model_tflops_per_device / self.peak_tflops if self.peak_tflops else None


def utilisation(
    shape: ModelShape,
    seq_len: int,
    step_s: float,
    devices: int = 1,
    batch: int = 1,
    device_name: str = "",
    peak: float | None = None,
) -> Utilisation:
    """MFU and tokens/s per device of a step of ``batch`` rows of ``seq_len`` tokens on ``devices``.

    Args:
        peak: the device's peak TFLOP/s; None: :func:`peak_tflops` of ``device_name``.
    """
    per_device = model_flops(shape, seq_len, batch) / step_s / devices / 1e12
    return Utilisation(
        tokens_per_s_per_device=batch * seq_len / step_s / devices,
        model_tflops_per_device=per_device,
        peak_tflops=peak if peak is not None else peak_tflops(device_name),
        device=device_name,
    )


def describe(u: Utilisation) -> str:
    """One line: MFU against the named peak (or why there is none) and tokens/s per device."""
    tail = f"{u.tokens_per_s_per_device:,.0f} tokens/s per GPU, {u.model_tflops_per_device:,.1f} model TFLOP/s per GPU"
    if u.mfu is None:
        return f"MFU: unknown peak for {u.device or 'this device'!r} (pass --peak-tflops); {tail}"
    return f"MFU {100 * u.mfu:.1f}% of {u.peak_tflops:,.0f} TFLOP/s (dense bf16 peak, {u.device or 'given'}); {tail}"
