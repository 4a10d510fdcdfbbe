"""What both recipes share: where the SP settings come from (``--sp-config``, ``$HF_SEQPAR_CONFIG``,
or the accelerate config file the launcher read), the one-process warning, tracker names, and
checkpoint folders (atomic writes, ``latest`` = the newest complete one, rotation).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

CHECKPOINT_PREFIX = "checkpoint-"
#: Written last into a checkpoint folder: a folder without it is incomplete (a crash while saving).
COMPLETE_FILE = "recipe_state.json"


def warn(prog: str, msg: str) -> None:
    """A warning on stderr, from the first rank only."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: WARNING: {msg}", file=sys.stderr, flush=True)


# ---- where the SP settings come from ---------------------------------------------------------


def _proc_args(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:  # "pid (comm) state ppid ...": comm may hold spaces
        return int(f.read().rsplit(")", 1)[1].split()[1])


def launcher_config_file() -> str | None:
    """The accelerate config file of the ``accelerate launch`` that started this process, or None.

    accelerate 1.15 hands the launched processes the settings it acted on (``ACCELERATE_*`` and
    ``PARALLELISM_CONFIG_*`` variables) but neither the file's path nor the other keys of its
    ``parallelism_config:`` section, so the launcher is found among this process's ancestors (Linux
    ``/proc``) and its ``--config_file`` read (no ``--config_file``: accelerate's default file).
    """
    if "LOCAL_RANK" not in os.environ:  # not started by a launcher
        return None
    pid = os.getppid()
    for _ in range(4):  # rank <- torchrun agent (in the launcher's process) <- accelerate launch
        try:
            argv = _proc_args(pid)
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return None
        if "launch" in argv and any(
            os.path.basename(a).startswith("accelerate")
            or a.endswith("accelerate_cli.py")
            or "accelerate.commands" in a
            for a in argv[:3]
        ):
            for i, a in enumerate(argv):
                if a in ("--config_file", "--config-file") and i + 1 < len(argv):
                    return os.path.join(cwd, argv[i + 1])
                if a.startswith(("--config_file=", "--config-file=")):
                    return os.path.join(cwd, a.split("=", 1)[1])
            from accelerate.commands.config import default_config_file

            return default_config_file if os.path.isfile(default_config_file) else None
        try:
            pid = _parent(pid)
        except (OSError, IndexError, ValueError):
            return None
        if pid <= 1:
            return None
    return None


def _sp_keys(path: str) -> list[str]:
    """The ``hf_seqpar_*`` keys of an accelerate config file's ``parallelism_config:`` section."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    section = data.get("parallelism_config") if isinstance(data, dict) else None
    return sorted(k for k in section if str(k).startswith("hf_seqpar_")) if isinstance(section, dict) else []


def load_sp_plugin(sp_config: str | None, prog: str):
    """``(plugin, source)``: the SP settings from ``--sp-config``, else ``$HF_SEQPAR_CONFIG``, else the
    ``hf_seqpar_*`` keys of the accelerate config file the launcher read (so one file is named once),
    else the defaults.

    Raises:
        SystemExit: two different files name SP settings, or the launcher read a ``parallelism_config``
            section this process cannot find to read (the message says what to pass).
    """
    from hf_seqpar.integrations.accelerate import SP_CONFIG_ENV, SequenceParallelPlugin

    explicit = sp_config or os.environ.get(SP_CONFIG_ENV)
    launcher = launcher_config_file()
    keys = _sp_keys(launcher) if launcher and os.path.isfile(launcher) else []
    try:
        if explicit:
            if keys and os.path.realpath(explicit) != os.path.realpath(launcher):
                raise SystemExit(
                    f"{prog}: error: two SP configs: the accelerate config {launcher} given to `accelerate "
                    f"launch` has {keys} in its parallelism_config section, and "
                    f"{'--sp-config' if sp_config else '$' + SP_CONFIG_ENV} names {explicit}; keep the "
                    "settings in one of them (drop --sp-config to use the accelerate file's keys)"
                )
            return SequenceParallelPlugin.load(explicit), explicit
        if keys:
            return SequenceParallelPlugin.from_yaml(launcher), f"{launcher} ({', '.join(keys)})"
        if launcher is None and os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG") == "true":
            raise SystemExit(
                f"{prog}: error: `accelerate launch` read a config file with a parallelism_config "
                "section, which may hold hf_seqpar_* keys, but this process cannot find that file to "
                "read them; pass it again as --sp-config FILE"
            )
        return SequenceParallelPlugin.load(None), "defaults (ulysses over all ranks)"
    except (OSError, ValueError) as e:
        raise SystemExit(f"{prog}: error: {e}") from None


def trl_sp_plugin(sp_config: str | None, prog: str, host: str):
    """The SP plugin of a TRL post-training recipe, checked before anything loads.

    Returns ``(plugin, source, world, sp_size)``: the plugin (:func:`load_sp_plugin`), where it came
    from, the launched processes and the SP degree the library's dry run (``hf_seqpar.resolve``)
    gives for them. Exits with the reason when the file is bad, asks for hf_seqpar's chunked loss
    (TRL's ``host`` scores tokens with its own fused, chunked LM head) or does not fit the world.
    Warns when the recipe runs in one process.
    """
    import hf_seqpar

    plugin, source = load_sp_plugin(sp_config, prog)
    if plugin.loss_chunk_size is not None:
        raise SystemExit(
            f"{prog}: error: loss_chunk_size={plugin.loss_chunk_size} in the SP config {source}: TRL's {host} "
            "scores tokens with its own fused, chunked LM head; use an SP config with loss_chunk_size: null."
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        sp_size = hf_seqpar.resolve(plugin, world).sp_size
    except ValueError as e:
        raise SystemExit(f"{prog}: error: {world} launched rank(s), SP config {source}: {e}") from None
    warn_if_one_process(prog)
    return plugin, source, world, sp_size


def warn_if_one_process(prog: str) -> None:
    """A recipe started without a launcher runs in one process, where SP has ``sp_size=1``: say so."""
    if "WORLD_SIZE" not in os.environ:
        warn(
            prog,
            "started without a launcher: ONE process, so sp_size=1 and nothing is sequence-parallel. "
            f"To shard each row over N ranks run `accelerate launch --num_processes N {sys.argv[0]} ...` "
            "(or torchrun --nproc_per_node N).",
        )


# ---- trackers --------------------------------------------------------------------------------


def report_to(value: str) -> list[str] | None:
    """``--report-to`` as accelerate's ``log_with`` (``none``: no tracker; ``all``: every installed one)."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names or names == ["none"]:
        return None
    return names if names != ["all"] else "all"


def tracker_config(args) -> dict:
    """The run's options as tracker hyperparameters (scalars and strings only)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}


# ---- checkpoint folders ----------------------------------------------------------------------


def checkpoints(output_dir: str) -> tuple[list[tuple[int, str]], list[str]]:
    """``(complete, incomplete)``: complete ``checkpoint-STEP`` folders as ``(step, path)`` by step, and
    the folders that lack their :data:`COMPLETE_FILE` (or whose file is unreadable)."""
    complete, incomplete = [], []
    if not os.path.isdir(output_dir):
        return complete, incomplete
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if not (
            name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX) :].isdigit() and os.path.isdir(path)
        ):
            continue
        try:
            with open(os.path.join(path, COMPLETE_FILE)) as f:
                json.load(f)
            complete.append((int(name[len(CHECKPOINT_PREFIX) :]), path))
        except (OSError, ValueError):
            incomplete.append(path)
    return sorted(complete), sorted(incomplete)


def latest_checkpoint(output_dir: str, prog: str) -> str | None:
    """The newest complete checkpoint folder in ``output_dir`` (incomplete ones skipped, with a message)."""
    complete, incomplete = checkpoints(output_dir)
    newest = complete[-1][0] if complete else -1
    skipped = [p for p in incomplete if int(os.path.basename(p)[len(CHECKPOINT_PREFIX) :]) > newest]
    if skipped:
        warn(
            prog,
            f"--resume-from latest: skipping incomplete checkpoint folder(s) {skipped} (no readable "
            f"{COMPLETE_FILE}: a save that did not finish)",
        )
    return complete[-1][1] if complete else None


def staging_dir(output_dir: str, step: int) -> str:
    """Where a checkpoint is written before :func:`publish` renames it into place."""
    return os.path.join(output_dir, f".partial-{CHECKPOINT_PREFIX}{step}")


def publish(staging: str, output_dir: str, step: int, total_limit: int) -> str:
    """Rename a fully written staging folder to ``checkpoint-STEP`` (one atomic rename; an older
    folder of that name is replaced) and delete the oldest complete checkpoints beyond
    ``total_limit`` (0: keep all). Main process only."""
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(staging, final)
    complete, _ = checkpoints(output_dir)
    if total_limit:
        for _, path in complete[:-total_limit]:
            shutil.rmtree(path)
    return final


# ---- the options the TRL post-training recipes share (dpo_trl.py, grpo_trl.py) ------------------


def add_trl_args(parser, *, output_dir: str, lr: float, batch_help: str, max_steps: int = 10) -> None:
    """Add the model, SP, optimisation and output options of the TRL post-training recipes."""
    parser.add_argument(
        "--sp-config", default=None, help="SP plugin YAML (default: $HF_SEQPAR_CONFIG, else Ulysses over all ranks)"
    )
    parser.add_argument("--model", default=None, help="model name or path (default: a tiny Llama built from a config)")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer name or path (default: the model's; byte-level without --model)"
    )
    parser.add_argument("--batch-size", type=int, default=2, help=batch_help)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=max_steps)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (default on GPUs; fp32 on CPU)")
    parser.add_argument("--logging-steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=output_dir)


def check_positive(parser, args, names) -> None:
    """``parser.error`` for the first of ``names`` (attribute names) below 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
