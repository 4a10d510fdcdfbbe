"""Attention kernels with log-sum-exp and their backends, installed as ``hf_seqpar.kernels``.

Knows nothing of transformers or process groups. ``reference`` is the float64 oracle used by
the tests.
"""

from .reference import reference_attention

__all__ = ["reference_attention"]
