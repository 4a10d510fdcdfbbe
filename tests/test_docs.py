"""The README's promises: its two Quick start commands, CI running the same test command, and
the demo training for real (loss going down on 2 ranks)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_exactly_two_quick_start_commands():
    cmds = _quick_start_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c and c.startswith("python3 -m venv .venv") for c in cmds)
    assert all("pip install torch==2.13.0 && pip install -e " in c for c in cmds)  # torch first
    assert "accelerate launch --config_file recipes/accelerate/cpu.yaml --num_processes 2 " in cmds[0]
    assert "recipes/finetune_long_context.py" in cmds[0] and "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    lines = ci.splitlines()
    assert _quick_start_commands()[1] in lines
    # the README's command runs the default suite (addopts: not slow, not e2e); CI then adds the
    # end-to-end tests, in the same environment, so that it still runs everything but -m slow
    assert lines.index("python -m pytest -m 'e2e and not slow'") > lines.index(_quick_start_commands()[1])
    import tomllib

    addopts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert addopts == "-m 'not slow and not e2e'"


@pytest.mark.e2e
def test_readme_demo_command_runs(tmp_path):
    """The launch part of the README's first command, verbatim but for a free port and the output dir."""
    import shlex
    import socket

    launch = _quick_start_commands()[0].split(" && ")[-1]
    args = shlex.split(launch)
    assert args[:2] == ["accelerate", "launch"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    args[args.index("--output-dir") + 1] = str(tmp_path / "demo")
    cmd = [str(pathlib.Path(sys.executable).parent / "accelerate"), "launch", "--main_process_port", port] + args[2:]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logged = re.findall(r"^step +(\d+)/(\d+) +loss (\d+\.\d+)", proc.stdout, re.M)
    steps, losses = [int(s) for s, _, _ in logged], [float(x) for _, _, x in logged]
    max_steps = int(args[args.index("--max-steps") + 1])
    # a line at the first step, every --log-every steps (default 10) and the last
    assert steps == sorted({1, max_steps, *range(10, max_steps + 1, 10)}), proc.stdout
    assert losses[-1] < losses[0] - 0.3, losses
    assert (tmp_path / "demo" / "config.json").exists()


@pytest.mark.e2e
@pytest.mark.slow  # 21 s; CI runs the README demo (the recipe under accelerate) and demo_cpu.py with megatron
def test_demo_trains_on_two_ranks(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "recipes" / "demo_cpu.py"),
        "--steps",
        "5",
        "--seq-len",
        "512",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", proc.stdout)]
    assert len(losses) == 5, proc.stdout
    assert losses[-1] < losses[0] - 0.3, losses


# --- every page's code blocks and links (README.md, CHANGELOG.md, docs/*.md) ---------------------

PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
#: repository paths a command or snippet names (checked to exist)
REPO_PATH = re.compile(r"(?<![\w/.])((?:recipes|tests|hf_seqpar|kernels|patches|docs)/[\w./-]+\.(?:py|ya?ml|sh|md))")


def _blocks(lang: str) -> list[tuple[str, str]]:
    """``(page, body)`` for every fenced block of this language in :data:`PAGES`."""
    out = []
    for page in PAGES:
        out += [(page.name, b) for b in re.findall(rf"```{lang}\n(.*?)\n```", page.read_text(), re.S)]
    return out


def _resolve(dotted: str):
    import importlib

    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[: i + 1]))  # a submodule not imported yet
    return obj


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 220


def test_python_blocks_compile_and_name_real_api():
    """Every python block parses, and every ``hf_seqpar.<name>...`` it uses exists."""
    import ast

    blocks = _blocks("python")
    assert len(blocks) >= 5, blocks
    for page, body in blocks:
        tree = ast.parse(body, filename=page)  # a SyntaxError names the page
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                chain, inner = [node.attr], node.value
                while isinstance(inner, ast.Attribute):
                    chain.insert(0, inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name) and inner.id == "hf_seqpar":
                    _resolve(".".join(["hf_seqpar", *chain]))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.keywords:
                target = node.func
                if isinstance(target.value, ast.Name) and target.value.id == "hf_seqpar":
                    import inspect

                    func = _resolve(f"hf_seqpar.{target.attr}")
                    if not inspect.isfunction(func):
                        continue  # classes may take keywords through a wrapped constructor (the Trainer's sp_plugin)
                    sig = inspect.signature(func)
                    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
                    for kw in node.keywords:
                        assert kw.arg is None or takes_any or kw.arg in sig.parameters, (page, target.attr, kw.arg)


def _shell_commands() -> list[tuple[str, str]]:
    cmds = []
    for page, body in _blocks("bash") + _blocks("console"):
        for line in body.replace("\\\n", " ").splitlines():  # a trailing backslash continues the command
            line = line.split("  #", 1)[0].strip()
            if body.startswith("$ ") and not line.startswith("$ "):
                continue  # output lines of a console block
            cmds.append((page, line.removeprefix("$ ")))
    return [c for c in cmds if c[1]]


def test_shell_blocks_name_real_files_and_cli_options():
    """Every file a bash/console command names exists; every ``hf-seqpar`` command parses."""
    import shlex

    from hf_seqpar.tools.cli import build_parser

    cmds = _shell_commands()
    assert len(cmds) >= 6, cmds
    for page, cmd in cmds:
        for path in REPO_PATH.findall(cmd):
            assert (ROOT / path).exists(), f"{page}: {cmd} names {path}, which does not exist"
        for part in cmd.split(" && "):
            args = shlex.split(part)
            if args and args[0] == "hf-seqpar":
                build_parser().parse_args(args[1:])  # argparse exits (SystemExit) on a bad option
            if args[:3] == ["python", "-m", "pytest"]:
                for a in args[3:]:
                    if not a.startswith("-") and "/" in a:
                        assert (ROOT / a.split("::")[0]).exists(), (page, cmd)


def test_console_blocks_show_what_the_command_prints(capsys):
    """A ``$ hf-seqpar plan ...`` block's shown output lines are lines the command prints today."""
    import shlex

    from hf_seqpar.tools.cli import main

    blocks = [(p, b) for p, b in _blocks("console") if b.startswith("$ hf-seqpar plan")]
    assert blocks
    for page, body in blocks:
        cmd, *shown = body.splitlines()
        main(shlex.split(cmd[2:])[1:])
        printed = capsys.readouterr().out.splitlines()
        for line in shown:
            assert line == "..." or line in printed, f"{page}: {line!r} not printed by {cmd!r}:\n" + "\n".join(printed)


def test_yaml_blocks_parse():
    import yaml

    for _page, body in _blocks("yaml"):
        yaml.safe_load(body)


def test_relative_links_point_to_files():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_family_table_lists_every_family_and_the_registry_refusals():
    """docs/model-families.md is current for what needs no rank: one row per causal-LM family of the
    installed transformers, sorted, and the rows of families refused without building them
    (tests/test_families.py compares every other row it runs with the family's result)."""
    import family_cases as fc
    import family_table

    rows = family_table.doc_rows()
    assert list(rows) == fc.causal_lm_families(), "run python tests/family_table.py --write"
    for model_type, text in rows.items():
        if not fc.through_registry(model_type):
            assert text == family_table.row(model_type, None), model_type
