"""The reversible patch behind ``hf-seqpar launch``: inside one launch, ``transformers.Trainer``
(and TRL's ``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer`` when TRL is installed) resolve to
subclasses built with :class:`hf_seqpar.SequenceParallelMixin`.

Why a patch is unavoidable: a script written for the stock ``Trainer`` constructs
``transformers.Trainer`` itself, and neither transformers nor accelerate has a hook through which
a plugin could add a mixin to that class (``TrainerCallback`` sees events, not the loss or the data
loaders; accelerate's plugins configure the ``Accelerator``, which never sees batches before the
Trainer shards them over all processes). So the names a script imports are rebound, for the
duration of :func:`sequence_parallel_trainers` only, and put back afterwards:

* ``transformers.Trainer`` and ``transformers.trainer.Trainer`` -> a subclass of
  :class:`hf_seqpar.SequenceParallelTrainer` (so ``isinstance(t, transformers.Trainer)`` holds);
* ``trl.X``, ``trl.trainer.X`` and ``X``'s defining module, for ``X`` in TRL's supported trainers
  and the ones :mod:`hf_seqpar.integrations.hosts` refuses -> ``(SequenceParallelMixin, X)``: SFT
  runs sequence-parallel, DPO/GRPO are refused at construction as the mixin refuses them (instead
  of training plain DDP silently).

Classes a script defines on top of them (``class MyTrainer(Trainer)``) inherit the mixin. Classes
created before the patch on the original ``Trainer`` (transformers' ``Seq2SeqTrainer``, TRL's other
trainers) are not covered; :func:`hf_seqpar.launch.main` warns loudly when no trainer was built under
SP. A TRL trainer module first imported during the launch keeps the patched base after it; a
launch runs one script per process, so nothing else sees it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import sys
from dataclasses import dataclass, field

__all__ = ["LaunchRecord", "sequence_parallel_trainers"]


@dataclass
class LaunchRecord:
    """What happened under the patch."""

    #: class name of every trainer whose sequence-parallel set-up completed, in construction order
    constructed: list[str] = field(default_factory=list)
    #: ``"module.attr"`` of every attribute rebound (and restored on exit)
    patched: list[str] = field(default_factory=list)


def _launch_class(name: str, bases: tuple, plugin, record: LaunchRecord) -> type:
    """``name(*bases)`` whose trainers get a copy of ``plugin`` unless given ``sp_plugin=``."""
    from hf_seqpar.integrations.trainer import SequenceParallelMixin

    def _sp_setup(self) -> None:
        if self.__dict__.get("_sp_plugin_arg") is None:
            self._sp_plugin_arg = copy.deepcopy(plugin)
        SequenceParallelMixin._sp_setup(self)
        record.constructed.append(type(self).__name__)

    doc = f"``{bases[-1].__module__}.{bases[-1].__name__}`` with sequence parallelism (installed by hf-seqpar launch)."
    return type(name, bases, {"__module__": __name__, "__doc__": doc, "_sp_setup": _sp_setup})


def _trl_hosts() -> list[type]:
    """TRL's trainers named in the host table (supported or refused), if TRL is installed."""
    try:
        trl = importlib.import_module("trl")
    except ImportError:
        return []
    from hf_seqpar.integrations.hosts import SUPPORTED_TRL_TRAINERS, WHY_NOT_YET

    found = []
    for name in sorted(SUPPORTED_TRL_TRAINERS | set(WHY_NOT_YET)):
        try:
            found.append(getattr(trl, name))
        except (ImportError, AttributeError):  # a TRL version without it, or its optional deps missing
            continue
    return found


def _rebind(original: type, replacement: type, saved: list, record: LaunchRecord) -> None:
    """Rebind every module attribute on ``original``'s dotted path that names it."""
    parts = original.__module__.split(".")
    for i in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:i]))
        try:
            current = getattr(module, original.__name__) if module is not None else None
        except (ImportError, AttributeError):  # a lazy package that does not export it
            continue
        if current is original:
            saved.append((module, original.__name__, original))
            setattr(module, original.__name__, replacement)
            record.patched.append(f"{module.__name__}.{original.__name__}")


@contextlib.contextmanager
def sequence_parallel_trainers(plugin):
    """Within the block, ``transformers.Trainer`` (and TRL's trainers of the host table) are SP classes.

    Args:
        plugin: the :class:`hf_seqpar.SequenceParallelPlugin` every trainer built in the block
            gets (a copy each), unless the script passes its own ``sp_plugin=``.

    Yields:
        A :class:`LaunchRecord`; every attribute is restored on exit, also after an exception.
    """
    import transformers
    import transformers.trainer

    from hf_seqpar.integrations.trainer import SequenceParallelMixin, SequenceParallelTrainer

    record, saved = LaunchRecord(), []
    hosts = [(transformers.Trainer, (SequenceParallelTrainer,), "SequenceParallelTrainer")]
    hosts += [(cls, (SequenceParallelMixin, cls), f"SequenceParallel{cls.__name__}") for cls in _trl_hosts()]
    try:
        for original, bases, name in hosts:
            _rebind(original, _launch_class(name, bases, plugin, record), saved, record)
        yield record
    finally:
        for module, attr, original in reversed(saved):
            setattr(module, attr, original)
