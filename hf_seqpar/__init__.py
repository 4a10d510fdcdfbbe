"""hf_seqpar: sequence parallelism for HuggingFace Transformers and Accelerate.

The public API::

    import hf_seqpar
    model = hf_seqpar.enable_sequence_parallel(model, strategy="ulysses", sp_size=None)
    hf_seqpar.resolve(config, world_size, model_config)  # optional dry run: the same checks, no process group
    local = hf_seqpar.shard_batch(batch, model)
    out = model(**local)
    full_logits = hf_seqpar.gather_sequence(out.logits, model)

Names are imported on first use (PEP 562), so ``import hf_seqpar`` and the ``hf-seqpar`` command's
``--help`` do not import torch or transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "enable_sequence_parallel": "hf_seqpar.api",
    "disable_sequence_parallel": "hf_seqpar.api",
    "unsharded": "hf_seqpar.api",
    "shard_batch": "hf_seqpar.core.sharding",
    "gather_sequence": "hf_seqpar.core.sharding",
    "SeqParBatch": "hf_seqpar.core.sharding",
    "BatchMismatchError": "hf_seqpar.core.sharding",
    "generate": "hf_seqpar.generation",
    "SequenceParallelConfig": "hf_seqpar.config",
    "resolve": "hf_seqpar.config",
    "SequenceParallelPlugin": "hf_seqpar.integrations.accelerate",
    "prepare_sequence_parallel": "hf_seqpar.integrations.accelerate",
    "SequenceParallelTrainer": "hf_seqpar.integrations.trainer",
    "SequenceParallelMixin": "hf_seqpar.integrations.trainer",
    "SeqParState": "hf_seqpar.core.mesh",
    "build_mesh": "hf_seqpar.core.mesh",
    "find_state": "hf_seqpar.core.mesh",
    "Layout": "hf_seqpar.core.layout",
    "CommCounter": "hf_seqpar.core.comm",
    "STRATEGIES": "hf_seqpar.strategies",
    "HeadsNotDivisibleError": "hf_seqpar.strategies.ulysses",
}

__all__ = list(_EXPORTS)
#: subpackages and modules reachable as attributes (``hf_seqpar.tp.full_tensor``), imported on first use
_SUBMODULES = ("api", "config", "core", "generation", "integrations", "kernels", "patches", "strategies", "tools", "tp")


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"hf_seqpar.{name}")
    raise AttributeError(f"module 'hf_seqpar' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
