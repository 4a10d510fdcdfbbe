"""Run a stock ``transformers.Trainer`` / TRL ``SFTTrainer`` script with sequence parallelism, unchanged.

::

    accelerate launch --num_processes 8 -m hf_seqpar.launch --sp-config recipes/sp/ring.yaml train.py --my-args
    torchrun --nproc_per_node 8 -m hf_seqpar.launch --sp-config recipes/sp/ring.yaml train.py --my-args
    torchrun --nproc_per_node 8 --no-python hf-seqpar launch --sp-config ... train.py ...   # the CLI form

Each process runs ``train.py`` (``runpy``, as ``__main__``, with ``sys.argv = [train.py, *args]``)
while :func:`hf_seqpar.patches.trainer_launch.sequence_parallel_trainers` makes
``transformers.Trainer`` (and TRL's trainers) the :class:`hf_seqpar.SequenceParallelMixin` classes,
with the SP config from ``--sp-config`` or ``$HF_SEQPAR_CONFIG`` (else the defaults: Ulysses over
all ranks). When the script built no trainer under SP, a loud warning says so at the end.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

__all__ = ["add_arguments", "launch_hosts", "main", "run_script"]

BANNER = "#" * 78


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``python -m hf_seqpar.launch`` and ``hf-seqpar launch``."""
    parser.add_argument(
        "--sp-config",
        default=None,
        help="SP config YAML (recipes/sp/*.yaml, or an accelerate config with hf_seqpar_* keys); "
        "default: $HF_SEQPAR_CONFIG, else Ulysses over all ranks",
    )
    parser.add_argument("script", help="the training script (run as __main__)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments passed to the script")


def launch_hosts() -> list[tuple[type, tuple]]:
    """The classes the launch replaces, with the bases of their SP classes: ``transformers.Trainer``
    (-> a :class:`~hf_seqpar.SequenceParallelTrainer` subclass) and TRL's trainers named in
    :mod:`hf_seqpar.integrations.hosts` (supported: SP; refused: refused at construction), if installed."""
    import importlib

    import transformers

    from hf_seqpar.integrations.hosts import SUPPORTED_TRL_TRAINERS, WHY_NOT_YET
    from hf_seqpar.integrations.trainer import SequenceParallelMixin, SequenceParallelTrainer

    hosts = [(transformers.Trainer, (SequenceParallelTrainer,))]
    try:
        trl = importlib.import_module("trl")
    except ImportError:
        return hosts
    for name in sorted(SUPPORTED_TRL_TRAINERS | set(WHY_NOT_YET)):
        try:
            cls = getattr(trl, name)
        except (ImportError, AttributeError):  # a TRL version without it, or its optional deps missing
            continue
        hosts.append((cls, (SequenceParallelMixin, cls)))
    return hosts


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _warn(lines: list[str]) -> None:
    if _rank() == 0:
        print(
            "\n".join([BANNER, *(f"# hf-seqpar launch: {line}" for line in lines), BANNER]), file=sys.stderr, flush=True
        )


def run_script(script: str, script_args: list[str], sp_config: str | None = None):
    """Run ``script`` under the trainer patch; return the :class:`~hf_seqpar.patches.trainer_launch.LaunchRecord`.

    Raises:
        FileNotFoundError: no such script, or no such SP config file.
        ValueError: an invalid SP config (before the script runs).
    """
    from hf_seqpar.integrations.accelerate import SP_CONFIG_ENV, SequenceParallelPlugin
    from hf_seqpar.patches.trainer_launch import sequence_parallel_trainers

    if not os.path.isfile(script):
        raise FileNotFoundError(f"hf-seqpar launch: training script {script!r} does not exist")
    source = sp_config or os.environ.get(SP_CONFIG_ENV) or "the defaults (ulysses over all ranks)"
    plugin = SequenceParallelPlugin.load(sp_config)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        _warn(
            [
                "ONE PROCESS: no launcher started several ranks, so sequence parallelism has sp_size=1 (nothing",
                "is sharded). Run under `accelerate launch -m hf_seqpar.launch ...` or `torchrun -m hf_seqpar.launch`.",
            ]
        )
    argv, path0 = sys.argv[:], sys.path[0]
    sys.argv, sys.path[0] = [script, *script_args], os.path.dirname(os.path.abspath(script))
    record = None
    try:
        with sequence_parallel_trainers(plugin, launch_hosts()) as record:
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv, sys.path[0] = argv, path0
        if record is not None and not record.constructed:
            covered = ", ".join(sorted({p.rsplit(".", 1)[1] for p in record.patched}))
            _warn(
                [
                    f"SEQUENCE PARALLELISM WAS NEVER APPLIED: {script} built no Trainer under the SP config from",
                    f"{source}; whatever it trained ran without SP (plain DDP). The launch covers these classes",
                    f"(and subclasses the script defines): {covered}.",
                    "A trainer class created before the launch (e.g. transformers' Seq2SeqTrainer, TRL's other",
                    "trainers) or a custom loop is not: use hf_seqpar.SequenceParallelMixin or",
                    "hf_seqpar.prepare_sequence_parallel in the script.",
                ]
            )
    return record


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m hf_seqpar.launch`` (and ``hf-seqpar launch``)."""
    parser = argparse.ArgumentParser(prog="hf-seqpar launch", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    run_script(args.script, args.script_args, args.sp_config)
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """Wait for every rank, then destroy the process group the script's Trainer created (if the
    script did not): a rank whose interpreter shuts down with gloo's threads still running can abort
    ("terminate called without an active exception"), which the launcher reports as a failure of
    the whole run after training succeeded (seen in CI)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
