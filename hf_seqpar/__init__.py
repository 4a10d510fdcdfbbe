"""hf_seqpar: sequence parallelism for HuggingFace Transformers and Accelerate.

The public API::

    import hf_seqpar
    model = hf_seqpar.enable_sequence_parallel(model, strategy="ulysses", sp_size=None)
    hf_seqpar.resolve(config, world_size, model_config)  # optional dry run: the same checks, no process group
    local = hf_seqpar.shard_batch(batch, model)
    out = model(**local)
    full_logits = hf_seqpar.gather_sequence(out.logits, model)
"""

__version__ = "0.1.0"

__all__ = [
    "enable_sequence_parallel",
    "disable_sequence_parallel",
    "shard_batch",
    "gather_sequence",
    "SequenceParallelConfig",
    "resolve",
    "SequenceParallelPlugin",
    "prepare_sequence_parallel",
    "SequenceParallelTrainer",
    "SequenceParallelMixin",
    "SeqParState",
    "SeqParBatch",
    "Layout",
    "CommCounter",
    "STRATEGIES",
    "build_mesh",
    "find_state",
    "BatchMismatchError",
    "HeadsNotDivisibleError",
]


#: public name -> the module that defines it; imported on first use (PEP 562), so that
#: ``import hf_seqpar.kernels`` (a leaf) does not import torch.distributed's users or transformers
_EXPORTS = {
    "SequenceParallelPlugin": "hf_seqpar.integrations.accelerate",
    "prepare_sequence_parallel": "hf_seqpar.integrations.accelerate",
    "enable_sequence_parallel": "hf_seqpar.api",
    "disable_sequence_parallel": "hf_seqpar.api",
    "CommCounter": "hf_seqpar.core.comm",
    "SequenceParallelConfig": "hf_seqpar.config",
    "resolve": "hf_seqpar.config",
    "Layout": "hf_seqpar.core.layout",
    "SeqParState": "hf_seqpar.core.mesh",
    "build_mesh": "hf_seqpar.core.mesh",
    "find_state": "hf_seqpar.core.mesh",
    "BatchMismatchError": "hf_seqpar.core.sharding",
    "SeqParBatch": "hf_seqpar.core.sharding",
    "gather_sequence": "hf_seqpar.core.sharding",
    "shard_batch": "hf_seqpar.core.sharding",
    "STRATEGIES": "hf_seqpar.strategies",
    "HeadsNotDivisibleError": "hf_seqpar.strategies.ulysses",
    "SequenceParallelTrainer": "hf_seqpar.integrations.trainer",  # transformers.Trainer is slow to import
    "SequenceParallelMixin": "hf_seqpar.integrations.trainer",
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_seqpar' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
