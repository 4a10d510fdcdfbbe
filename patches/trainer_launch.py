"""The reversible patch behind ``hf-seqpar launch``: inside one launch, ``transformers.Trainer``
(and TRL's ``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``, ``RLOOTrainer`` when TRL is installed) resolve to
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
  and the ones :mod:`hf_seqpar.integrations.hosts` refuses -> ``(SequenceParallelMixin, X)``: SFT,
  DPO and GRPO run sequence-parallel, RLOO is refused at construction as the mixin refuses it
  (instead of training plain DDP silently).

(:func:`hf_seqpar.launch.launch_hosts` names these classes and their bases: this module, in the
patches layer, imports nothing of the integrations.) Classes a script defines on top of them
(``class MyTrainer(Trainer)``) inherit the mixin. Classes created before the patch on the
original ``Trainer`` (transformers' ``Seq2SeqTrainer``, TRL's other trainers) are not covered;
:func:`hf_seqpar.launch.run_script` warns loudly when no trainer was built under SP. A class
defined during the launch on a patched name (the script's own, or one of a library the script
imports first) keeps its SP base afterwards; a launch runs one script per process.
"""

from __future__ import annotations

import contextlib
import copy
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


def _launch_class(original: type, bases: tuple, plugin, record: LaunchRecord) -> type:
    """``SequenceParallel<original>(*bases)`` whose trainers get a copy of ``plugin`` unless given ``sp_plugin=``."""

    def _sp_setup(self) -> None:
        if self.__dict__.get("_sp_plugin_arg") is None:
            self._sp_plugin_arg = copy.deepcopy(plugin)
        super(cls, self)._sp_setup()
        record.constructed.append(type(self).__name__)

    doc = f"``{original.__module__}.{original.__name__}`` with sequence parallelism (installed by hf-seqpar launch)."
    cls = type(
        f"SequenceParallel{original.__name__}", bases, {"__module__": __name__, "__doc__": doc, "_sp_setup": _sp_setup}
    )
    return cls


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
def sequence_parallel_trainers(plugin, hosts):
    """Within the block, each host class's module attributes name its SP class; restored on exit.

    Args:
        plugin: the :class:`hf_seqpar.SequenceParallelPlugin` every trainer built in the block
            gets (a copy each), unless the script passes its own ``sp_plugin=``.
        hosts: ``(original, bases)`` pairs: ``original`` (e.g. ``transformers.Trainer``) is replaced
            by a class ``SequenceParallel<name>(*bases)``; ``bases`` must make it a subclass of
            ``original`` with :class:`hf_seqpar.SequenceParallelMixin` (whose ``_sp_setup`` it extends).

    Yields:
        A :class:`LaunchRecord`; every attribute is restored on exit, also after an exception.
    """
    record, saved = LaunchRecord(), []
    try:
        for original, bases in hosts:
            _rebind(original, _launch_class(original, bases, plugin, record), saved, record)
        yield record
    finally:
        for module, attr, original in reversed(saved):
            setattr(module, attr, original)
