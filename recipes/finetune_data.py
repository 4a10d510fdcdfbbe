"""Data for recipes/finetune_long_context.py: load, tokenize (plain text, chat, prompt-completion),
cap document lengths, split off a held-out set, pack into long rows.

An *example* is ``(ids, labels)``: token ids and, per token, whether it is trained on (its own
id) or not (``-100``: prompt and user turns of chat/prompt-completion data). Packed rows restart
``position_ids`` at every example (and at every piece of a capped one), and the first token of each
is never a label, so no token attends to or predicts across examples.
"""

from __future__ import annotations

import os
import pathlib
import sysconfig

import torch

IGNORE = -100
#: The byte-level stand-in for a chat template (the default offline tokenizer has none).
BYTE_TURN = "<|{role}|>\n{content}<|end|>\n"
BYTE_GENERATION_PROMPT = "<|assistant|>\n"

__all__ = ["load_table", "data_format", "to_examples", "cap_length", "split_heldout", "pack_examples"]


def load_table(args):
    """The dataset as a ``datasets.Dataset``: standard-library sources offline, local files, or the Hub."""
    from datasets import Dataset, load_dataset

    if args.dataset is None:  # offline default: the standard library's own sources
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)[: args.max_docs]
        return Dataset.from_dict({args.text_column: [p.read_text(errors="replace") for p in files]})
    if os.path.exists(args.dataset):
        path = pathlib.Path(args.dataset)
        files = sorted(str(f) for f in path.rglob("*") if f.is_file()) if path.is_dir() else [str(path)]
        ext = pathlib.Path(files[0]).suffix.lstrip(".")
        builder = {"txt": "text", "jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(ext)
        if builder is None:
            raise ValueError(f"--dataset {args.dataset}: unsupported file type {ext!r}; use .txt/.json/.jsonl/.parquet/.csv")
        ds = load_dataset(builder, data_files=files, split="train")
    else:
        ds = load_dataset(args.dataset, args.dataset_config, split=args.dataset_split)
    return ds.select(range(min(len(ds), args.max_docs)))


def data_format(columns: list[str], args) -> str:
    """``text``, ``chat`` or ``prompt-completion``, from ``--data-format`` or the columns.

    Raises:
        ValueError: the columns the format needs are missing (the message lists the columns).
    """
    fmt = args.data_format
    if fmt == "auto":
        fmt = ("chat" if args.messages_column in columns else
               "prompt-completion" if {"prompt", "completion"} <= set(columns) else "text")
    need = {"text": [args.text_column], "chat": [args.messages_column], "prompt-completion": ["prompt", "completion"]}[fmt]
    missing = [c for c in need if c not in columns]
    if missing:
        raise ValueError(f"--data-format {fmt} needs column(s) {missing}; the dataset has {columns} (pass "
                         "--text-column / --messages-column, or --data-format)")
    return fmt


def _encode(text: str, tokenizer) -> list[int]:
    if tokenizer is None:
        return list(text.encode("utf-8"))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(messages: list[dict], tokenizer, generation_prompt: bool) -> str:
    if tokenizer is None:
        text = "".join(BYTE_TURN.format(role=m["role"], content=m["content"]) for m in messages)
        return text + (BYTE_GENERATION_PROMPT if generation_prompt else "")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_example(messages: list[dict], tokenizer, n_prompt: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels: the assistant turns only (or, with
    ``n_prompt``, the messages from index ``n_prompt`` on, prompt-completion style).

    The conversation is rendered with the tokenizer's chat template (byte-level: ``BYTE_TURN``);
    each trained turn is located as the text between the rendering of the messages before it
    (with the generation prompt) and the rendering through it.

    Raises:
        ValueError: the tokenizer has no chat template, or its template does not render a
            conversation's prefixes as prefixes of the whole (the completion cannot be located).
    """
    if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat data needs a tokenizer with a chat template; pass --tokenizer with one (e.g. an "
                         "-Instruct model's), or use the byte-level default (no --tokenizer/--model)")
    trained = [i for i, m in enumerate(messages) if (m["role"] == "assistant" if n_prompt is None else i >= n_prompt)]
    ids, labels, done = [], [], ""
    for i in trained:
        before = _render(messages[:i], tokenizer, True) if i else ""
        through = _render(messages[: i + 1], tokenizer, False)
        if not (before.startswith(done) and through.startswith(before)):
            raise ValueError("the chat template does not render a conversation's first turns as a prefix of the "
                             "whole, so the completion tokens cannot be located; use a template that does")
        for text, train in ((before[len(done):], False), (through[len(before):], True)):
            piece = _encode(text, tokenizer)
            ids += piece
            labels += piece if train else [IGNORE] * len(piece)
        done = through
    rest = _encode(_render(messages, tokenizer, False)[len(done):], tokenizer)
    return ids + rest, labels + [IGNORE] * len(rest)


def to_examples(ds, fmt: str, tokenizer, args) -> list[tuple[list[int], list[int]]]:
    """``(ids, labels)`` per row of the dataset (empty rows dropped)."""
    eos = [tokenizer.eos_token_id] if tokenizer is not None and tokenizer.eos_token_id is not None else []
    out = []
    for row in ds:
        if fmt == "text":
            if not row[args.text_column]:
                continue
            ids = _encode(row[args.text_column], tokenizer) + eos
            if tokenizer is not None and tokenizer.bos_token_id is not None:
                ids = [tokenizer.bos_token_id] + ids
            out.append((ids, list(ids)))
        elif fmt == "chat":
            out.append(chat_example(row[args.messages_column], tokenizer))
        else:
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, list):  # conversational prompt-completion: loss on the completion turns
                out.append(chat_example(prompt + completion, tokenizer, n_prompt=len(prompt)))
            else:
                p, c = _encode(prompt, tokenizer), _encode(completion, tokenizer) + eos
                out.append((p + c, [IGNORE] * len(p) + c))
    return [e for e in out if e[0]]


def cap_length(examples: list, max_len: int | None) -> list:
    """Split every example longer than ``max_len`` tokens into pieces of at most ``max_len``
    (each piece a document of its own: positions restart, its first token is no label)."""
    if not max_len:
        return examples
    return [(ids[i:i + max_len], labels[i:i + max_len]) for ids, labels in examples
            for i in range(0, len(ids), max_len)]


def split_heldout(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """``(train, heldout)``: a seeded random ``fraction`` of the examples (at least one) held out."""
    if fraction <= 0:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n = max(1, round(fraction * len(examples)))
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def pack_examples(examples: list, seq_len: int) -> list[dict]:
    """Rows of ``seq_len`` tokens: examples concatenated, ``position_ids`` restarting at each (a
    row that starts inside one restarts it at 0), labels ``-100`` at every restart and wherever the
    example masks them. The tail that does not fill a row is dropped."""
    ids, labels, pos, rows = [], [], [], []
    for e_ids, e_labels in examples:
        ids += e_ids
        labels += e_labels
        pos += range(len(e_ids))
        while len(ids) >= seq_len:
            row_pos = torch.tensor(pos[:seq_len])
            starts = (row_pos == 0).nonzero()
            head = int(starts[0]) if len(starts) else seq_len
            row_pos[:head] -= row_pos[0].clone()
            row_labels = torch.tensor(labels[:seq_len]).masked_fill(row_pos == 0, IGNORE)
            rows.append({"input_ids": torch.tensor(ids[:seq_len]), "labels": row_labels, "position_ids": row_pos})
            ids, labels, pos = ids[seq_len:], labels[seq_len:], pos[seq_len:]
    return rows
