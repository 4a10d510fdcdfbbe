"""recipes/: the fine-tuning recipe under `accelerate launch` on 2 CPU ranks for every available
strategy (loss goes down, tensorboard scalars, the checkpoint loads with plain transformers / PEFT),
evaluation, checkpoints (atomic, rotated, no pickle run on resume) and exact resume, one config file
named once, chat data with a tokenizer, one process and NaN losses, the checks made before anything
is loaded, the data functions (datasets folders, bfd packing), the configs and docs; sft_trl.py's
checkpoints and exact resume. Subprocess launches are marked `e2e`."""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest
import torch

from hf_seqpar.strategies import STRATEGIES

ROOT = pathlib.Path(__file__).resolve().parents[1]
ACCELERATE = str(pathlib.Path(sys.executable).parent / "accelerate")
AVAILABLE = list(STRATEGIES)


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch_recipe(script: str, *args, cwd, config: str = "recipes/accelerate/cpu.yaml") -> str:
    """``recipes/<script>`` under ``accelerate launch`` on 2 CPU ranks; its stdout (it must exit 0)."""
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / config), "--num_processes", "2"]
    cmd += ["--main_process_port", _port(), str(ROOT / "recipes" / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _run(out_dir, *args, config: str = "recipes/accelerate/cpu.yaml") -> str:
    return launch_recipe(
        "finetune_long_context.py",
        "--output-dir",
        str(out_dir),
        "--log-every",
        "1",
        *args,
        cwd=out_dir.parent,
        config=config,
    )


def _scalars(out_dir) -> dict[str, dict[int, float]]:
    """The tensorboard scalars written under ``out_dir``: ``{tag: {step: value}}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for events in pathlib.Path(out_dir).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return found


def _losses(stdout: str, steps: int) -> dict[int, str]:
    """Logged loss per step, as printed (6 decimals; the runs log every step)."""
    return {int(s): x for s, x in re.findall(rf"^step +(\d+)/{steps} +loss (\d+\.\d+)", stdout, re.M)}


def _launch(strategy: str, out_dir, *extra) -> list[float]:
    stdout = _run(out_dir, "--sp-config", str(ROOT / f"recipes/sp/{strategy}.yaml"), "--max-steps", "6", *extra)
    assert f"strategy={strategy} sp_size=2" in stdout, stdout
    losses = [float(x) for x in _losses(stdout, 6).values()]
    assert len(losses) == 6, stdout
    assert re.search(r"peak memory MiB per rank \[\d+, \d+\]", stdout), stdout
    return losses


def _loss_of(model) -> float:
    ids = torch.tensor([list(b"def main():\n    return 0\n" * 4)])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "strategy",
    # ulysses: the resume test; megatron and hybrid (35 s each) run with -m slow, to keep CI under 20 minutes
    [
        pytest.param(s, marks=pytest.mark.slow) if s in ("megatron", "hybrid") else s
        for s in AVAILABLE
        if s != "ulysses"
    ],
)
def test_recipe_full_finetune(strategy, tmp_path):
    """Loss goes down; tensorboard event files under the output folder hold loss, lr and grad norm
    for every step (the loss as printed); the saved model loads, with the user's use_cache (True)."""
    from transformers import AutoModelForCausalLM

    losses = _launch(strategy, tmp_path / "out", "--report-to", "tensorboard")
    assert losses[-1] < losses[0] - 0.3, losses
    scalars = _scalars(tmp_path / "out")
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_memory_mib"):
        assert sorted(scalars.get(tag, {})) == list(range(1, 7)), (tag, scalars.keys())
    assert [round(scalars["train/loss"][s], 4) for s in range(1, 7)] == [round(x, 4) for x in losses]
    assert scalars["train/lr"][1] == pytest.approx(3e-3) and scalars["train/lr"][6] < scalars["train/lr"][2]
    assert all(v > 0 for v in scalars["train/grad_norm"].values())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config._attn_implementation == "sdpa"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["use_cache"] is True
    assert _loss_of(model) < 5.0  # trained: random init scores ~ln(256) = 5.5


@pytest.mark.e2e
def test_recipe_lora(tmp_path):
    from peft import AutoPeftModelForCausalLM

    losses = _launch("ulysses", tmp_path / "out", "--lora")
    assert losses[-1] < losses[0], losses
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b)  # trained (B starts at zero)
    with model.disable_adapter():
        base_loss = _loss_of(model)
    assert _loss_of(model) < base_loss  # the adapter improves on the saved base model


@pytest.mark.e2e
def test_recipe_help_lists_the_flags():
    out = subprocess.run(
        [sys.executable, str(ROOT / "recipes/finetune_long_context.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for flag in (
        "--sp-config",
        "--model",
        "--dataset",
        "--max-seq-len",
        "--max-steps",
        "--output-dir",
        "--lora",
        "--tokenizer",
        "--data-format",
        "--messages-column",
        "--max-doc-len",
        "--eval-every",
        "--eval-fraction",
        "--save-every",
        "--save-total-limit",
        "--resume-from",
        "--report-to",
        "--log-every",
        "--packing",
        "--num-proc",
    ):
        assert flag in out, flag
    # the docstring as written: shell continuations and the literal "\n" of the byte chat format kept
    assert "--num_processes 2 \\\n        recipes/finetune_long_context.py" in out, out[:1500]
    assert "<|role|>\\ncontent<|end|>\\n" in out, out[:3000]
    for group in ("sequence parallelism:", "model and tokenizer:", "data:", "training:", "evaluation and checkpoints:"):
        assert group in out, group


@pytest.mark.e2e
def test_recipe_in_one_process_warns_and_a_nan_loss_fails(tmp_path):
    """Started without a launcher: a warning names `accelerate launch --num_processes N`. A loss that
    turns NaN (lr 1e30, no clipping) stops the run with a non-zero exit and no saved model."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "HF_SEQPAR_CONFIG")}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipes/finetune_long_context.py"),
            "--output-dir",
            str(tmp_path / "out"),
            "--max-steps",
            "5",
            "--max-seq-len",
            "256",
            "--max-docs",
            "2",
            "--lr",
            "1e30",
            "--max-grad-norm",
            "0",
            "--log-every",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "ONE process, so sp_size=1" in proc.stderr and "accelerate launch --num_processes N" in proc.stderr
    assert re.search(r"error: the training loss is nan at step \d+: stopped, and no model saved", proc.stderr), (
        proc.stderr[-2000:]
    )
    assert not (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / "config.json").exists()


@pytest.mark.e2e
def test_trl_recipe_in_one_process_warns_and_trains(tmp_path):
    """A TRL recipe started without a launcher warns (one process, sp_size=1) and then trains on a
    one-rank group (the mixin creates it, as prepare_sequence_parallel does), instead of stopping with
    "torch.distributed is not initialised"."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "HF_SEQPAR_CONFIG")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes/dpo_trl.py"), "--output-dir", str(tmp_path / "out"), "--max-steps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ONE process, so sp_size=1" in proc.stderr, proc.stderr[-2000:]
    assert re.search(r"^step +1/1 loss \S+", proc.stdout, re.M) and (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("name", ["cpu", "gpu-8", "gpu-multinode"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / f"recipes/accelerate/{name}.yaml"))
    assert cfg.num_processes == {"cpu": 2, "gpu-8": 8, "gpu-multinode": 32}[name]
    if name != "cpu":
        assert cfg.distributed_type == "FSDP" and cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.num_processes == 8 * cfg.num_machines


# ---- evaluation, checkpoints, exact resume; the one-config-file path ------------------------

RESUME_RUN = [
    "--max-steps",
    "10",
    "--max-docs",
    "2",
    "--max-seq-len",
    "1024",
    "--max-doc-len",
    "300",
    "--eval-every",
    "5",
    "--eval-fraction",
    "0.3",
    "--save-every",
    "3",
    "--save-total-limit",
    "2",
]


class _Payload:
    """Unpickling this creates the file ``path`` (what a malicious pickle in a checkpoint could do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.e2e
def test_recipe_eval_checkpoints_and_exact_resume(tmp_path):
    """One accelerate config file, named once (cpu-sp.yaml: 2 ranks + the SP settings, strategy auto ->
    ulysses, read from the file the launcher read). 10 steps over 7 rows per epoch with held-out
    evaluation every 5 steps and a checkpoint every 3, the newest 2 kept. Then checkpoint-9 is made
    incomplete (as a crash while saving leaves it) and accelerate's RNG pickles in checkpoint-6 are
    replaced by pickles that create a file when loaded (custom_checkpoint_*.pkl files are refused:
    test_resume_refuses_custom_pickles): ``--resume-from latest`` skips checkpoint-9 with a message, runs no pickle, and
    resuming from checkpoint-6 (mid-epoch 1) gives the uninterrupted run's losses, evaluation and final
    weights exactly."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    full = _run(tmp_path / "full", *RESUME_RUN, config="recipes/accelerate/cpu-sp.yaml")
    assert "strategy=ulysses sp_size=2" in full and "7 batches per epoch" in full, full
    assert "SP config: " + str(ROOT / "recipes/accelerate/cpu-sp.yaml") in full, full
    assert "--max-docs 2: using the first 2 of" in full, full
    losses = _losses(full, 10)
    assert sorted(losses) == list(range(1, 11)), full
    assert float(losses[10]) < float(losses[1]) - 0.3, losses
    evals = re.findall(r"^eval at step (\d+): loss (\d+\.\d+) over 3 held-out rows", full, re.M)
    assert [e[0] for e in evals] == ["5", "10"] and float(evals[1][1]) < float(evals[0][1]), full
    kept = sorted(p.name for p in (tmp_path / "full").iterdir() if p.name.startswith(("checkpoint-", ".partial")))
    assert kept == ["checkpoint-6", "checkpoint-9"], kept  # --save-total-limit 2 removed checkpoint-3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert _loss_of(model) < 5.0  # trained: random init scores ~ln(256) = 5.5

    a = load_file(tmp_path / "full" / "model.safetensors")
    (tmp_path / "full" / "checkpoint-9" / "recipe_state.json").unlink()  # a save that did not finish
    marker = tmp_path / "pickle-ran"
    for name in ("random_states_0.pkl", "random_states_1.pkl"):  # accelerate's; read with weights_only=True
        torch.save(_Payload(marker), tmp_path / "full" / "checkpoint-6" / name)
    resumed = _run(tmp_path / "full", *RESUME_RUN, "--resume-from", "latest", config="recipes/accelerate/cpu-sp.yaml")
    assert not marker.exists(), "a pickle in the checkpoint was run on resume"
    assert re.search(r"resumed from .*checkpoint-6 at step 6 \(epoch 1, batch 6 of 7\)", resumed), resumed
    assert _losses(resumed, 10) == {s: losses[s] for s in (7, 8, 9, 10)}, (resumed, losses)
    assert re.findall(r"^eval at step 10: loss (\d+\.\d+)", resumed, re.M) == [evals[1][1]], resumed
    b = load_file(tmp_path / "full" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- chat data with a tokenizer --------------------------------------------------------------

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _byte_tokenizer(path):
    """A byte-level BPE tokenizer without merges (offline) with BOS/EOS and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", additional_special_tokens=["<|user|>", "<|assistant|>"]
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def _conversations(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}. " * 3},
                {"role": "user", "content": "And doubled?"},
                {"role": "assistant", "content": f"Doubled it is {4 * i}."},
            ]
        }
        for i in range(n)
    ]


@pytest.mark.e2e
def test_recipe_chat_data_with_a_tokenizer(tmp_path):
    tok = _byte_tokenizer(tmp_path / "tok")
    data_file = tmp_path / "chat.jsonl"
    data_file.write_text("".join(json.dumps(c) + "\n" for c in _conversations(60)))
    # one config file, named once: `hf_seqpar_strategy: ring` in the accelerate file is what runs
    accel = tmp_path / "accel-ring.yaml"
    accel.write_text(
        (ROOT / "recipes/accelerate/cpu-sp.yaml")
        .read_text()
        .replace("hf_seqpar_strategy: auto", "hf_seqpar_strategy: ring")
    )
    out = _run(
        tmp_path / "out",
        "--dataset",
        str(data_file),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--max-seq-len",
        "256",
        "--max-doc-len",
        "96",
        "--max-steps",
        "6",
        config=str(accel),
    )
    assert "strategy=ring sp_size=2" in out and "chat data" in out, out
    losses = [float(x) for x in _losses(out, 6).values()]
    assert len(losses) == 6 and losses[-1] < losses[0], out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.vocab_size == len(tok) == 260
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == CHAT_TEMPLATE


# ---- the recipe's data functions (in process) -------------------------------------------------


@pytest.fixture(scope="module")
def recipe():
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        yield importlib.import_module("finetune_long_context")
    finally:
        sys.path.remove(str(ROOT / "recipes"))


def _trained_text(ids, labels, tok) -> str:
    kept = [i for i, label in zip(ids, labels) if label != -100]
    return bytes(kept).decode() if tok is None else tok.decode(kept)


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_chat_and_prompt_completion_train_on_completions_only(recipe, tmp_path, with_tokenizer):
    data = recipe.data
    tok = _byte_tokenizer(tmp_path / "tok") if with_tokenizer else None
    conv = _conversations(3)[2]["messages"]
    ids, labels = data.chat_example(conv, tok)
    assert len(ids) == len(labels)
    end = "</s>\n" if tok else "<|end|>\n"
    assert _trained_text(ids, labels, tok) == "2 plus 2 is 4. " * 3 + end + "Doubled it is 8." + end
    full = (
        tok.apply_chat_template(conv, tokenize=False)
        if tok
        else "".join(data.BYTE_TURN.format(role=m["role"], content=m["content"]) for m in conv)
    )
    assert (tok.decode(ids) if tok else bytes(ids).decode()) == full  # every token of the conversation, in order
    # conversational prompt-completion: loss on the completion messages
    ids, labels = data.chat_example(conv, tok, n_prompt=3)
    assert _trained_text(ids, labels, tok) == "Doubled it is 8." + end
    # plain prompt-completion
    args = recipe.parse_args([])
    ds = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}]
    [(ids, labels)] = data.to_examples(ds, "prompt-completion", tok, args)
    assert _trained_text(ids, labels, tok) == " 4" + ("</s>" if tok else "")
    assert (
        data.data_format(["messages"], args) == "chat"
        and data.data_format(["prompt", "completion"], args) == "prompt-completion"
        and data.data_format(["text", "id"], args) == "text"
    )
    with pytest.raises(ValueError, match="needs column"):
        data.data_format(["body"], args)


def test_max_doc_len_pieces_restart_positions_and_pack(recipe):
    data = recipe.data
    examples = [(list(range(10)), list(range(10))), ([50, 51, 52], [-100, 51, 52])]
    capped = data.cap_length(examples, 4)
    assert [e[0] for e in capped] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [50, 51, 52]]
    rows = data.pack_examples(capped, 6)
    assert len(rows) == 2  # 13 tokens -> 2 rows of 6, the tail dropped
    assert rows[0]["position_ids"].tolist() == [0, 1, 2, 3, 0, 1]
    assert rows[0]["labels"].tolist() == [-100, 1, 2, 3, -100, 5]  # each piece's first token is no label
    assert rows[1]["position_ids"].tolist() == [0, 1, 0, 1, 0, 1]  # the row starts inside a piece: restart at 0
    assert rows[1]["labels"].tolist() == [-100, 7, -100, 9, -100, 51]
    train, held = data.split_heldout(capped, 0.25, seed=0)
    assert len(held) == 1 and len(train) == 3 and sorted(map(str, train + held)) == sorted(map(str, capped))


# ---- the checks made before the model and the data are loaded --------------------------------


@pytest.fixture
def nothing_loaded(recipe, monkeypatch):
    """Loading a model, tokenizer or data fails the test (the checks must come first)."""

    def loaded(*args, **kwargs):
        raise AssertionError("a model, tokenizer or data was loaded before the options were checked")

    for name in ("build_model", "load_tokenizer"):
        monkeypatch.setattr(recipe, name, loaded)
    monkeypatch.setattr(recipe.data, "load_table", loaded)
    monkeypatch.delenv("HF_SEQPAR_CONFIG", raising=False)


@pytest.mark.parametrize(
    "argv, env, words",
    [
        (["--max-steps", "0"], {}, ["--max-steps", ">= 1", "0"]),
        (["--max-doc-len", "0"], {}, ["--max-doc-len", ">= 1"]),
        (["--eval-every", "5", "--eval-fraction", "1.5"], {}, ["--eval-fraction", "(0, 1)"]),
        (["--warmup-steps", "30", "--max-steps", "10"], {}, ["--warmup-steps 30", "--max-steps 10"]),
        (["--lr", "-1"], {}, ["--lr", "> 0"]),
        (
            ["--sp-config", str(ROOT / "recipes/sp/ulysses.yaml")],
            {"WORLD_SIZE": "3"},
            ["3 launched rank(s)", "4 query heads", "3"],
        ),
        (
            ["--sp-config", str(ROOT / "recipes/sp/hybrid.yaml")],
            {"WORLD_SIZE": "3"},
            ["3 launched rank(s)", "ulysses_size"],
        ),
        (["--resume-from", "nowhere"], {}, ["--resume-from nowhere", "recipe_state.json"]),
        (["--max-docs", "0"], {}, ["--max-docs", ">= 1"]),
        (["--save-total-limit", "-1"], {}, ["--save-total-limit", ">= 0"]),
    ],
)
def test_recipe_checks_options_before_loading_anything(recipe, nothing_loaded, monkeypatch, argv, env, words):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as err:
        recipe.main(argv)
    for w in words:
        assert w in str(err.value), str(err.value)


# ---- data through `datasets`, packing that keeps documents whole -------------------------------


def test_load_table_reads_a_dataset_folder_with_a_card_and_prints_caps(recipe, tmp_path):
    """A normal HF dataset folder (data files + README.md card) loads; --max-docs says what it drops;
    the default keeps every row."""
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# a dataset card\n")
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(7)))
    said = []
    args = recipe.parse_args(["--dataset", str(folder)])
    assert args.max_docs is None
    ds = recipe.data.load_table(args, lambda *a, **k: said.append(a[0]))
    assert ds["text"] == [f"document {i}" for i in range(7)] and said == []
    args = recipe.parse_args(["--dataset", str(folder), "--max-docs", "5"])
    ds = recipe.data.load_table(args, lambda *a, **k: said.append(a[0]))
    assert len(ds) == 5 and said == ["--max-docs 5: using the first 5 of 7 rows (2 dropped)"]
    # tokenised through Dataset.map, the same examples as row by row
    args = recipe.parse_args(["--dataset", str(folder), "--num-proc", "2"])
    ds = recipe.data.load_table(args)
    cache = pathlib.Path(ds.cache_files[0]["filename"]).parent

    def cached():
        return sorted(p.name for p in cache.glob("cache-*.arrow"))

    before = cached()
    assert recipe.data.tokenize(ds, "text", None, args) == recipe.data.to_examples(ds, "text", None, args)
    made = cached()
    assert len(made) > len(before)  # the tokenised rows were written next to the dataset
    recipe.data.tokenize(ds, "text", None, args)
    assert cached() == made  # and a second run (or another rank) reads them instead of tokenising again


def test_bfd_packing_keeps_documents_whole(recipe):
    data = recipe.data
    lengths = [7, 3, 5, 2, 6, 1, 4]  # 28 tokens; best-fit decreasing into rows of 8: [7,1] [6,2] [5,3] [4]
    examples = [([100 * k + j for j in range(n)], [100 * k + j for j in range(n)]) for k, n in enumerate(lengths)]
    rows = data.pack_bfd(examples, 8)
    assert len(rows) == 4
    seen = []
    for row in rows:
        ids, pos, labels = (row[k].tolist() for k in ("input_ids", "position_ids", "labels"))
        assert len(ids) == 8
        starts = [i for i, p in enumerate(pos) if p == 0] + [8]
        for a, b in zip(starts, starts[1:]):
            assert pos[a:b] == list(range(b - a)) and labels[a] == -100
            if ids[a] != 0 or b - a == lengths[ids[a] // 100]:  # a document, whole, not padding
                k = ids[a] // 100
                assert ids[a:b] == examples[k][0] and labels[a + 1 : b] == examples[k][0][1:]
                seen.append(k)
            else:  # the row's padded tail: trained on nothing
                assert set(ids[a:b]) == {0} and set(labels[a:b]) == {-100}
    assert sorted(seen) == list(range(len(lengths)))  # every document exactly once
    assert sorted(sum(len(e[0]) for e in examples if True) for _ in [0]) == [28]
    # an example longer than a row is split by pack() (and said), never by pack_bfd
    said = []
    rows = data.pack([(list(range(1, 20)), list(range(1, 20)))], 8, "bfd", lambda *a, **k: said.append(a[0]))
    assert [r["position_ids"].tolist() for r in rows] == [list(range(8)), list(range(8)), [0, 1, 2, 0, 1, 2, 3, 4]]
    assert said and "1 of 1 examples are longer than a row of 8 tokens" in said[0]
    with pytest.raises(ValueError, match="does not fit a row of 8"):
        data.pack_bfd([(list(range(9)), list(range(9)))], 8)


# ---- configs: model-agnostic FSDP wrapping, one config file named once -------------------------


@pytest.mark.parametrize("name", ["gpu-8", "gpu-multinode", "gpu-1-offload", "gpu-8-offload", "gpu-multinode-offload"])
def test_gpu_configs_wrap_any_models_decoder_layers(name):
    """No hard-coded layer class: accelerate's FSDP2 transformer wrap falls back to the model's
    _no_split_modules, so a Qwen2 model wraps its Qwen2DecoderLayers."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from transformers import Qwen2Config, Qwen2ForCausalLM

    fsdp = load_config_from_file(str(ROOT / f"recipes/accelerate/{name}.yaml")).fsdp_config
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"],
        transformer_cls_names_to_wrap=fsdp.get("fsdp_transformer_layer_cls_to_wrap"),
    )
    model = Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=64,
        )
    )
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert [type(m).__name__ for m in model.modules() if policy(m)] == ["Qwen2DecoderLayer"] * 2


def test_sp_settings_named_twice_are_refused(recipe, tmp_path, monkeypatch):
    """The accelerate file the launcher read has hf_seqpar_* keys and --sp-config names another file:
    refused, naming both (which one would win is not guessed)."""
    common = importlib.import_module("recipe_common")
    monkeypatch.delenv("HF_SEQPAR_CONFIG", raising=False)
    launcher = str(ROOT / "recipes/accelerate/cpu-sp.yaml")
    monkeypatch.setattr(common, "launcher_config_file", lambda: launcher)
    plugin, source = common.load_sp_plugin(None, "x")
    assert plugin.loss_chunk_size == 1024 and source.startswith(launcher)  # read from the launcher's file
    with pytest.raises(SystemExit, match="two SP configs.*cpu-sp.yaml.*ring.yaml"):
        common.load_sp_plugin(str(ROOT / "recipes/sp/ring.yaml"), "x")
    assert common.load_sp_plugin(launcher, "x")[0].loss_chunk_size == 1024  # the same file twice is fine
    monkeypatch.setattr(common, "launcher_config_file", lambda: None)
    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    with pytest.raises(SystemExit, match="pass it again as --sp-config"):
        common.load_sp_plugin(None, "x")


# ---- docs agree with the code: sdpa needs no S x S mask for a packed row ------------------------


def test_sdpa_packed_row_has_no_s_by_s_mask(tmp_path):
    """recipes/README.md and README.md say a packed row under SP's sdpa path needs O(S) memory, no
    S x S mask. Checked: every tensor handed to torch's SDPA (and every attention_mask a decoder
    layer's attention sees) for a packed 512-token row of 3 documents has fewer than S*S elements,
    while the plain model builds an S x S mask for the same row; the losses agree (fp32, ~1e-6)."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_seqpar

    S = 512
    pos = torch.cat([torch.arange(n) for n in (200, 150, 162)])[None]
    ids = torch.randint(0, 256, (1, S), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "position_ids": pos}

    def run(model, inputs):
        seen = []
        real = F.scaled_dot_product_attention

        def spy(q, k, v, attn_mask=None, **kw):
            seen.append(0 if attn_mask is None else attn_mask.numel())
            return real(q, k, v, attn_mask=attn_mask, **kw)

        hooks = [
            m.register_forward_pre_hook(
                lambda mod, a, kw: seen.append(
                    kw["attention_mask"].numel() if torch.is_tensor(kw.get("attention_mask")) else 0
                ),
                with_kwargs=True,
            )
            for m in model.modules()
            if type(m).__name__ == "LlamaAttention"
        ]
        F.scaled_dot_product_attention = spy
        try:
            with torch.no_grad():
                loss = float(model(**inputs).loss)
        finally:
            F.scaled_dot_product_attention = real
            for h in hooks:
                h.remove()
        return loss, max(seen)

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config)
    sp_model = LlamaForCausalLM(config)
    sp_model.load_state_dict(plain.state_dict())
    plain_loss, plain_mask = run(plain, {**batch, "use_cache": False})  # no cache: transformers reads the packing
    assert plain_mask >= S * S  # the contrast: transformers' own sdpa path builds the dense mask
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        hf_seqpar.enable_sequence_parallel(sp_model, "ulysses", 1)
        sp_loss, sp_mask = run(sp_model, hf_seqpar.shard_batch(batch, sp_model))
    finally:
        dist.destroy_process_group()
    assert sp_mask < S * S, sp_mask
    assert abs(sp_loss - plain_loss) < 1e-5, (sp_loss, plain_loss)
    for doc in ("recipes/README.md", "README.md"):  # and no doc claims otherwise
        text = re.sub(r"\s+", " ", (ROOT / doc).read_text())
        assert not re.search(r"sdpa[^.]*needs? an `?S x S", text), doc


def test_resume_refuses_custom_pickles(recipe, nothing_loaded, tmp_path):
    """A checkpoint holding custom_checkpoint_*.pkl (which accelerate unpickles with weights_only=False)
    is refused before anything is loaded, and the pickle is not run; `latest` is the newest complete
    folder, an incomplete newer one is skipped."""
    args = recipe.parse_args([])
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "recipe_state.json").write_text(
        json.dumps(
            {"step": 4, "world_size": 1, "sp_size": 1, "args": {k: getattr(args, k) for k in recipe.RESUME_KEYS}}
        )
    )
    (tmp_path / "checkpoint-8").mkdir()  # incomplete: no recipe_state.json
    (tmp_path / "checkpoint-8" / "model.safetensors").write_bytes(b"")
    marker = tmp_path / "pickle-ran"
    torch.save(_Payload(marker), ckpt / "custom_checkpoint_0.pkl")
    with pytest.raises(SystemExit) as err:
        recipe.main(["--resume-from", "latest", "--output-dir", str(tmp_path)])
    assert "checkpoint-4" in str(err.value) and "custom_checkpoint_0.pkl" in str(err.value), str(err.value)
    assert not marker.exists()
    common = importlib.import_module("recipe_common")
    assert common.latest_checkpoint(str(tmp_path), "x") == str(ckpt)


# ---- recipes/sft_trl.py: shipped SP configs, LoRA base, chat data, checkpoints, exact resume -------


def _sft(out_dir, *args) -> subprocess.CompletedProcess:
    cmd = [
        ACCELERATE,
        "launch",
        "--config_file",
        str(ROOT / "recipes/accelerate/cpu.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        _port(),
        str(ROOT / "recipes/sft_trl.py"),
        "--output-dir",
        str(out_dir),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=out_dir.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.e2e
def test_sft_trl_shipped_config_lora_chat_checkpoints_and_exact_resume(tmp_path):
    """sft_trl.py with a shipped SP config (ring.yaml sets loss_chunk_size: the recipe says it drops
    it), chat data with the default byte-level tokenizer, LoRA, held-out evaluation, tensorboard and a
    checkpoint every 2 steps; resuming from checkpoint-2 gives the uninterrupted run's metrics for
    steps 3-4 (num_tokens aside: TRL 1.16 restarts its token counter on resume), its evaluation and
    its adapter weights exactly; the adapter loads with its saved base model."""
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    data_file = tmp_path / "chat.jsonl"
    data_file.write_text("".join(json.dumps(c) + "\n" for c in _conversations(40)))
    run = [
        "--sp-config",
        str(ROOT / "recipes/sp/ring.yaml"),
        "--dataset",
        str(data_file),
        "--max-length",
        "256",
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--eval-fraction",
        "0.2",
        "--eval-steps",
        "2",
        "--lora",
        "--lr",
        "1e-2",
    ]
    full = _sft(tmp_path / "full", *run, "--report-to", "tensorboard")
    assert "strategy=ring sp_size=2" in full.stdout, full.stdout
    assert full.stderr.count("loss_chunk_size=1024") == 1 and "runs with loss_chunk_size: null" in full.stderr

    def metrics(stdout):
        return {int(s): m for s, m in re.findall(r"^step +(\d+)/4 (loss .*) num_tokens", stdout, re.M)}

    steps = metrics(full.stdout)
    assert sorted(steps) == [1, 2, 3, 4], full.stdout
    evals = re.findall(r"^eval at step (\d+): loss (\S+)", full.stdout, re.M)
    assert [e[0] for e in evals] == ["2", "4"], full.stdout
    assert (tmp_path / "full" / "checkpoint-2").is_dir() and (tmp_path / "full" / "checkpoint-4").is_dir()
    assert sorted(_scalars(tmp_path / "full").get("train/loss", {})) == [1, 2, 3, 4]

    resumed = _sft(tmp_path / "resumed", *run, "--resume-from", str(tmp_path / "full" / "checkpoint-2"))
    assert metrics(resumed.stdout) == {3: steps[3], 4: steps[4]}, (resumed.stdout, steps)
    assert re.findall(r"^eval at step (\d+): loss (\S+)", resumed.stdout, re.M) == [evals[1]], resumed.stdout
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "full")
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path / "full" / "base_model")


def test_recipes_readme_lists_the_plugins_keys():
    """recipes/README.md's list of SP config keys is the plugin's fields (no removed `options`)."""
    import dataclasses

    from hf_seqpar.integrations.accelerate import SequenceParallelPlugin

    text = re.sub(r"\s+", " ", (ROOT / "recipes/README.md").read_text())
    listed = re.search(r"Keys are the plugin's fields: (.*?)\. Unknown keys", text).group(1)
    assert re.findall(r"`(\w+)`", listed) == [f.name for f in dataclasses.fields(SequenceParallelPlugin)]


@pytest.mark.e2e
def test_grpo_trl_recipe_runs_on_two_cpu_ranks(tmp_path):
    """recipes/grpo_trl.py under accelerate launch, offline default (addition prompts, rule rewards),
    a reference model (beta > 0): trains, logs TRL's GRPO metrics each step, saves a loadable model."""
    from transformers import AutoModelForCausalLM

    stdout = launch_recipe(
        "grpo_trl.py",
        *("--max-steps", "3", "--max-prompts", "8", "--beta", "0.04", "--lr", "1e-3"),
        *("--no-progress", "--output-dir", str(tmp_path / "out")),
        cwd=tmp_path,
    )
    assert "strategy=ulysses sp_size=2 dp_size=1 loss_type=dapo" in stdout, stdout
    assert "generation_batch_size=4" in stdout, stdout  # 4 per micro-batch x 1 replica x 1 step per generation
    steps = re.findall(
        r"^step +\d+/3 loss (\S+) grad_norm (\S+) reward (\S+) reward_std (\S+) rewards/correct/mean \S+ "
        r"rewards/digits/mean \S+ kl (\S+) entropy (\S+)",
        stdout,
        re.M,
    )
    assert len(steps) == 3, stdout
    kls = [float(s[4]) for s in steps]
    assert kls[0] == 0.0 and kls[-1] > 0.0, steps  # reference = initial policy, then the policy moves away
    assert all(float(s[1]) > 0 and float(s[5]) > 0 for s in steps), steps
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "LlamaForCausalLM"
