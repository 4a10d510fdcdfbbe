"""recipes/: the fine-tuning recipe under `accelerate launch` on 2 CPU ranks for every available
strategy (loss goes down, the checkpoint loads with plain transformers / PEFT), evaluation,
checkpoints and exact resume, chat data with a tokenizer, the checks made before anything is
loaded, the recipe's data functions, and the configs."""

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


def _run(out_dir, *args, config: str = "recipes/accelerate/cpu.yaml") -> str:
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / config), "--num_processes", "2",
           "--main_process_port", _port(), str(ROOT / "recipes/finetune_long_context.py"), "--output-dir", str(out_dir),
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=out_dir.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _losses(stdout: str, steps: int) -> dict[int, str]:
    """Logged loss per step, as printed (6 decimals)."""
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
@pytest.mark.parametrize("strategy", [s for s in AVAILABLE if s != "ulysses"])  # ulysses: the resume test
def test_recipe_full_finetune(strategy, tmp_path):
    from transformers import AutoModelForCausalLM

    losses = _launch(strategy, tmp_path / "out")
    assert losses[-1] < losses[0] - 0.3, losses
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config._attn_implementation == "sdpa"
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
    out = subprocess.run([sys.executable, str(ROOT / "recipes/finetune_long_context.py"), "--help"],
                         capture_output=True, text=True, timeout=120).stdout
    for flag in ("--sp-config", "--model", "--dataset", "--max-seq-len", "--max-steps", "--output-dir", "--lora",
                 "--tokenizer", "--data-format", "--messages-column", "--max-doc-len", "--eval-every",
                 "--eval-fraction", "--save-every", "--resume-from"):
        assert flag in out, flag
    for group in ("sequence parallelism:", "model and tokenizer:", "data:", "training:", "evaluation and checkpoints:"):
        assert group in out, group


@pytest.mark.parametrize("name", ["cpu", "gpu-8", "gpu-multinode"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / f"recipes/accelerate/{name}.yaml"))
    assert cfg.num_processes == {"cpu": 2, "gpu-8": 8, "gpu-multinode": 32}[name]
    if name != "cpu":
        assert cfg.distributed_type == "FSDP" and cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.num_processes == 8 * cfg.num_machines


# ---- evaluation, checkpoints, exact resume; the one-config-file path ------------------------

RESUME_RUN = ["--sp-config", str(ROOT / "recipes/accelerate/cpu-sp.yaml"), "--max-steps", "10", "--max-docs", "2",
              "--max-seq-len", "1024", "--max-doc-len", "300", "--eval-every", "5", "--eval-fraction", "0.3",
              "--save-every", "4"]


@pytest.mark.e2e
def test_recipe_eval_checkpoints_and_exact_resume(tmp_path):
    """One accelerate config file for the whole run (cpu-sp.yaml: 2 ranks + the SP settings, strategy
    auto -> ulysses). 10 steps over 5 rows per epoch with held-out evaluation every 5 steps and a
    checkpoint every 4; resuming from checkpoint-8 (epoch 2, mid-epoch) gives the uninterrupted run's
    losses, evaluation and final weights exactly."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    full = _run(tmp_path / "full", *RESUME_RUN, config="recipes/accelerate/cpu-sp.yaml")
    assert "strategy=ulysses sp_size=2" in full and "5 batches per epoch" in full, full
    losses = _losses(full, 10)
    assert sorted(losses) == list(range(1, 11)), full
    assert float(losses[10]) < float(losses[1]) - 0.3, losses
    evals = re.findall(r"^eval at step (\d+): loss (\d+\.\d+) over 2 held-out rows", full, re.M)
    assert [e[0] for e in evals] == ["5", "10"] and float(evals[1][1]) < float(evals[0][1]), full
    for step in (4, 8):
        assert (tmp_path / "full" / f"checkpoint-{step}" / "recipe_state.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert _loss_of(model) < 5.0  # trained: random init scores ~ln(256) = 5.5

    resumed = _run(tmp_path / "resumed", *RESUME_RUN, "--resume-from", str(tmp_path / "full" / "checkpoint-8"),
                   config="recipes/accelerate/cpu-sp.yaml")
    assert re.search(r"resumed from .*checkpoint-8 at step 8 \(epoch 2, batch 3 of 5\)", resumed), resumed
    assert _losses(resumed, 10) == {9: losses[9], 10: losses[10]}, (resumed, losses)
    assert re.findall(r"^eval at step 10: loss (\d+\.\d+)", resumed, re.M) == [evals[1][1]], resumed
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- chat data with a tokenizer --------------------------------------------------------------

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _byte_tokenizer(path):
    """A byte-level BPE tokenizer without merges (offline) with BOS/EOS and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def _conversations(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}. " * 3},
                          {"role": "user", "content": "And doubled?"},
                          {"role": "assistant", "content": f"Doubled it is {4 * i}."}]} for i in range(n)]


@pytest.mark.e2e
def test_recipe_chat_data_with_a_tokenizer(tmp_path):
    tok = _byte_tokenizer(tmp_path / "tok")
    data_file = tmp_path / "chat.jsonl"
    data_file.write_text("".join(json.dumps(c) + "\n" for c in _conversations(60)))
    out = _run(tmp_path / "out", "--sp-config", str(ROOT / "recipes/sp/ring.yaml"), "--dataset", str(data_file),
               "--tokenizer", str(tmp_path / "tok"), "--max-seq-len", "256", "--max-doc-len", "96", "--max-steps", "6")
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
    full = tok.apply_chat_template(conv, tokenize=False) if tok else "".join(
        data.BYTE_TURN.format(role=m["role"], content=m["content"]) for m in conv)
    assert (tok.decode(ids) if tok else bytes(ids).decode()) == full  # every token of the conversation, in order
    # conversational prompt-completion: loss on the completion messages
    ids, labels = data.chat_example(conv, tok, n_prompt=3)
    assert _trained_text(ids, labels, tok) == "Doubled it is 8." + end
    # plain prompt-completion
    args = recipe.parse_args([])
    ds = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}]
    [(ids, labels)] = data.to_examples(ds, "prompt-completion", tok, args)
    assert _trained_text(ids, labels, tok) == " 4" + ("</s>" if tok else "")
    assert data.data_format(["messages"], args) == "chat" and data.data_format(["prompt", "completion"], args) == \
        "prompt-completion" and data.data_format(["text", "id"], args) == "text"
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

@pytest.mark.parametrize("argv, env, words", [
    (["--max-steps", "0"], {}, ["--max-steps", ">= 1", "0"]),
    (["--max-doc-len", "0"], {}, ["--max-doc-len", ">= 1"]),
    (["--eval-every", "5", "--eval-fraction", "1.5"], {}, ["--eval-fraction", "(0, 1)"]),
    (["--warmup-steps", "30", "--max-steps", "10"], {}, ["--warmup-steps 30", "--max-steps 10"]),
    (["--lr", "-1"], {}, ["--lr", "> 0"]),
    (["--sp-config", str(ROOT / "recipes/sp/ulysses.yaml")], {"WORLD_SIZE": "3"},
     ["3 launched rank(s)", "4 query heads", "3"]),
    (["--sp-config", str(ROOT / "recipes/sp/hybrid.yaml")], {"WORLD_SIZE": "3"}, ["3 launched rank(s)", "ulysses_size"]),
    (["--resume-from", "nowhere"], {}, ["--resume-from nowhere", "recipe_state.json"]),
])
def test_recipe_checks_options_before_loading_anything(recipe, monkeypatch, argv, env, words):
    def loaded(*args, **kwargs):
        raise AssertionError("a model, tokenizer or data was loaded before the options were checked")

    for name in ("build_model", "load_tokenizer"):
        monkeypatch.setattr(recipe, name, loaded)
    monkeypatch.setattr(recipe.data, "load_table", loaded)
    monkeypatch.delenv("HF_SEQPAR_CONFIG", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as err:
        recipe.main(argv)
    for w in words:
        assert w in str(err.value), str(err.value)
