"""The default CUDA backend order, from a per-device table of measured attention speed.

``hf-seqpar bench --kernels`` (:mod:`hf_seqpar.tools.kernelbench`) measures forward+backward
TFLOP/s of every CUDA backend on the device it runs on, for dense causal rows (one document) and
packed rows (many documents: masked tiles), checks each against the float64 reference, and writes
a JSON whose ``"table_entry"`` is one row of :data:`MEASURED`. A backend's place in the default order
is its geometric-mean speed over the lengths measured; one that failed the correctness check, or
was not measured, comes after the measured ones in :data:`FALLBACK` order. A device not in the
table gets :data:`FALLBACK` (the order hf_seqpar used before the table existed). A backend named
in the config (``attention_backend``) overrides all of this, as before.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["MEASURED", "FALLBACK", "CASES", "order_from_table", "device_order", "table_entry"]

#: The order without a measurement: flash-attn when installed, aten's flash, then memory-efficient.
FALLBACK: tuple[str, ...] = ("flash_attn", "cuda_flash", "cuda_efficient")
#: Which measured case ranks the backends for a block: dense blocks by the causal rows, blocks
#: that need a mask (documents, padding, windows) by the packed rows.
CASES = {False: "causal", True: "packed"}

#: ``{device name (torch.cuda.get_device_name): {case: {backend: TFLOP/s}}}``; a backend that failed
#: the correctness check is absent from its case. No device has been measured yet: every device
#: gets :data:`FALLBACK` until a row from ``hf-seqpar bench --kernels`` is added here.
MEASURED: dict[str, dict[str, dict[str, float]]] = {}


def order_from_table(
    device_name: str, needs_mask: bool, table: dict | None = None, fallback: tuple[str, ...] = FALLBACK
) -> tuple[str, ...]:
    """The backend preference for blocks on ``device_name``.

    Args:
        device_name: the CUDA device's name.
        needs_mask: whether the block needs a mask (ranks by the ``packed`` case, else ``causal``).
        table: a table shaped like :data:`MEASURED` (default: :data:`MEASURED`).
        fallback: the order of backends the table does not rank.

    Returns:
        Measured backends by speed (fastest first), then the others in ``fallback`` order.
    """
    table = MEASURED if table is None else table
    speeds = table.get(device_name, {}).get(CASES[needs_mask], {})
    ranked = sorted((b for b in speeds if speeds[b] > 0), key=lambda b: -speeds[b])
    return tuple(ranked) + tuple(b for b in fallback if b not in ranked)


@functools.lru_cache(maxsize=16)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_order(device: torch.device, needs_mask: bool) -> tuple[str, ...]:
    """:func:`order_from_table` for a CUDA device (its name read once per device index; without a
    CUDA runtime, e.g. when argument building is tested on CPU, :data:`FALLBACK`)."""
    if not torch.cuda.is_available():
        return order_from_table("", needs_mask)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return order_from_table(_device_name(index), needs_mask)


def table_entry(rows: list[dict]) -> dict[str, dict[str, float]]:
    """One :data:`MEASURED` row from kernel-bench rows.

    Each row: ``{"backend", "case", "seq_len", "tflops", "correct"}``. A backend's entry for a case
    is the geometric mean of its TFLOP/s over the lengths, only if it was correct at every length
    it ran and ran at every length any backend ran for that case (a backend that ran out of memory
    at 128K is not ranked on its shorter lengths alone).
    """
    out: dict[str, dict[str, float]] = {}
    for case in sorted({r["case"] for r in rows}):
        mine = [r for r in rows if r["case"] == case]
        lengths = {r["seq_len"] for r in mine}
        entry = {}
        for backend in sorted({r["backend"] for r in mine}):
            runs = [r for r in mine if r["backend"] == backend]
            if {r["seq_len"] for r in runs} != lengths or not all(r["correct"] and r["tflops"] for r in runs):
                continue
            entry[backend] = math.exp(sum(math.log(r["tflops"]) for r in runs) / len(runs))
        out[case] = entry
    return out
