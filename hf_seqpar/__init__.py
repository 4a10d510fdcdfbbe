"""hf_seqpar: sequence parallelism for HuggingFace Transformers and Accelerate.

The public API::

    import hf_seqpar
    model = hf_seqpar.enable_sequence_parallel(model, strategy="ulysses", sp_size=None)
    local = hf_seqpar.shard_batch(batch, model)
    out = model(**local)
    full_logits = hf_seqpar.gather_sequence(out.logits, model)
"""

from hf_seqpar.integrations.accelerate import SequenceParallelPlugin, prepare_sequence_parallel
from hf_seqpar.api import disable_sequence_parallel, enable_sequence_parallel
from hf_seqpar.core.comm import CommCounter
from hf_seqpar.config import SequenceParallelConfig
from hf_seqpar.core.layout import Layout
from hf_seqpar.core.mesh import SeqParState, build_mesh, find_state
from hf_seqpar.core.sharding import BatchMismatchError, SeqParBatch, gather_sequence, shard_batch
from hf_seqpar.generation import generate
from hf_seqpar.strategies import STRATEGIES
from hf_seqpar.strategies.ulysses import HeadsNotDivisibleError

__version__ = "0.1.0"

__all__ = [
    "enable_sequence_parallel",
    "disable_sequence_parallel",
    "shard_batch",
    "gather_sequence",
    "generate",
    "SequenceParallelConfig",
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


def __getattr__(name):
    if name in ("SequenceParallelTrainer", "SequenceParallelMixin"):  # imported on first use: transformers.Trainer
        from hf_seqpar.integrations import trainer  # is slow to import

        return getattr(trainer, name)
    raise AttributeError(f"module 'hf_seqpar' has no attribute {name!r}")
