"""Data for recipes/finetune_long_context.py: load (``datasets.load_dataset``), tokenize (plain
text, chat, prompt-completion; ``Dataset.map``), cap document lengths, split off a held-out set,
pack into long rows (best-fit decreasing, or wrapped).

An *example* is ``(ids, labels)``: token ids and, per token, whether it is trained on (its own
id) or not (``-100``: prompt and user turns of chat/prompt-completion data). Packed rows restart
``position_ids`` at every example (and at every piece of a capped one), and the first token of each
is never a label, so no token attends to or predicts across examples.
"""

from __future__ import annotations

import os
import pathlib
import sysconfig
import types

import torch

IGNORE = -100
#: The byte-level stand-in for a chat template (the default offline tokenizer has none).
BYTE_TURN = "<|{role}|>\n{content}<|end|>\n"
BYTE_GENERATION_PROMPT = "<|assistant|>\n"
#: ``datasets`` builder per local file suffix.
BUILDERS = {"txt": "text", "jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv", "arrow": "arrow"}

__all__ = [
    "load_table",
    "data_format",
    "example",
    "to_examples",
    "tokenize",
    "cap_length",
    "split_heldout",
    "pack",
    "pack_bfd",
    "pack_examples",
]


def load_table(args, say=print):
    """The dataset as a ``datasets.Dataset``: standard-library sources offline, else
    ``datasets.load_dataset`` of a local file, a local folder (any layout ``load_dataset`` reads, a
    ``README.md`` dataset card included) or a Hub name. ``--max-docs`` keeps the first N rows and
    says how many it dropped.

    Raises:
        ValueError: a local file of a type ``datasets`` has no builder for.
    """
    from datasets import Dataset, load_dataset

    if args.dataset is None:  # offline default: the standard library's own sources
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)
        ds = Dataset.from_dict({args.text_column: [p.read_text(errors="replace") for p in files]})
    elif os.path.isfile(args.dataset):
        ext = pathlib.Path(args.dataset).suffix.lstrip(".")
        builder = BUILDERS.get(ext)
        if builder is None:
            raise ValueError(
                f"--dataset {args.dataset}: unsupported file type {ext!r}; use "
                f"{'/'.join('.' + e for e in BUILDERS)}, or a folder / Hub name datasets.load_dataset reads"
            )
        ds = load_dataset(builder, data_files=[args.dataset], split="train")
    else:  # a local folder or a Hub name: datasets finds the files / the builder
        ds = load_dataset(args.dataset, args.dataset_config, split=args.dataset_split)
    if args.max_docs is not None and args.max_docs < len(ds):
        say(
            f"--max-docs {args.max_docs}: using the first {args.max_docs} of {len(ds)} rows ({len(ds) - args.max_docs} "
            "dropped)",
            flush=True,
        )
        ds = ds.select(range(args.max_docs))
    return ds


def data_format(columns: list[str], args) -> str:
    """``text``, ``chat`` or ``prompt-completion``, from ``--data-format`` or the columns.

    Raises:
        ValueError: the columns the format needs are missing (the message lists the columns).
    """
    fmt = args.data_format
    if fmt == "auto":
        fmt = (
            "chat"
            if args.messages_column in columns
            else "prompt-completion"
            if {"prompt", "completion"} <= set(columns)
            else "text"
        )
    need = {"text": [args.text_column], "chat": [args.messages_column], "prompt-completion": ["prompt", "completion"]}[
        fmt
    ]
    missing = [c for c in need if c not in columns]
    if missing:
        raise ValueError(
            f"--data-format {fmt} needs column(s) {missing}; the dataset has {columns} (pass "
            "--text-column / --messages-column, or --data-format)"
        )
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


def require_chat_template(tokenizer) -> None:
    """Raises ValueError (naming the fix) when ``tokenizer`` is not None and has no chat template."""
    if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "chat data needs a tokenizer with a chat template; pass --tokenizer with one (e.g. an "
            "-Instruct model's), or use the byte-level default (no --tokenizer/--model)"
        )


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
    require_chat_template(tokenizer)
    trained = [i for i, m in enumerate(messages) if (m["role"] == "assistant" if n_prompt is None else i >= n_prompt)]
    ids, labels, done = [], [], ""
    for i in trained:
        before = _render(messages[:i], tokenizer, True) if i else ""
        through = _render(messages[: i + 1], tokenizer, False)
        if not (before.startswith(done) and through.startswith(before)):
            raise ValueError(
                "the chat template does not render a conversation's first turns as a prefix of the "
                "whole, so the completion tokens cannot be located; use a template that does"
            )
        for text, train in ((before[len(done) :], False), (through[len(before) :], True)):
            piece = _encode(text, tokenizer)
            ids += piece
            labels += piece if train else [IGNORE] * len(piece)
        done = through
    rest = _encode(_render(messages, tokenizer, False)[len(done) :], tokenizer)
    return ids + rest, labels + [IGNORE] * len(rest)


def example(row: dict, fmt: str, tokenizer, args) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of one row (empty ids for an empty text)."""
    eos = [tokenizer.eos_token_id] if tokenizer is not None and tokenizer.eos_token_id is not None else []
    if fmt == "text":
        if not row[args.text_column]:
            return [], []
        ids = _encode(row[args.text_column], tokenizer) + eos
        if tokenizer is not None and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        return ids, list(ids)
    if fmt == "chat":
        return chat_example(row[args.messages_column], tokenizer)
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):  # conversational prompt-completion: loss on the completion turns
        return chat_example(prompt + completion, tokenizer, n_prompt=len(prompt))
    p, c = _encode(prompt, tokenizer), _encode(completion, tokenizer) + eos
    return p + c, [IGNORE] * len(p) + c


def to_examples(ds, fmt: str, tokenizer, args) -> list[tuple[list[int], list[int]]]:
    """``(ids, labels)`` per row of ``ds`` (any iterable of rows; empty rows dropped)."""
    return [e for e in (example(row, fmt, tokenizer, args) for row in ds) if e[0]]


def tokenize(ds, fmt: str, tokenizer, args) -> list[tuple[list[int], list[int]]]:
    """:func:`to_examples` through ``datasets.Dataset.map``: ``--num-proc`` workers, and the result
    cached next to a file-backed dataset (a second run, or the other ranks after rank 0, read it)."""
    if fmt == "chat":
        require_chat_template(tokenizer)  # the clear error here, before any worker starts
    # only what the encoding depends on, so the cache fingerprint does not change with other options
    cols = types.SimpleNamespace(text_column=args.text_column, messages_column=args.messages_column)

    def encode(row):
        ids, labels = example(row, fmt, tokenizer, cols)
        return {"ids": ids, "labels": labels}

    out = ds.map(encode, remove_columns=ds.column_names, num_proc=args.num_proc, desc="tokenizing")
    return [(i, lab) for i, lab in zip(out["ids"], out["labels"]) if i]


def cap_length(examples: list, max_len: int | None) -> list:
    """Split every example longer than ``max_len`` tokens into pieces of at most ``max_len``
    (each piece a document of its own: positions restart, its first token is no label)."""
    if not max_len:
        return examples
    return [
        (ids[i : i + max_len], labels[i : i + max_len]) for ids, labels in examples for i in range(0, len(ids), max_len)
    ]


def split_heldout(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """``(train, heldout)``: a seeded random ``fraction`` of the examples (at least one) held out."""
    if fraction <= 0:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n = max(1, round(fraction * len(examples)))
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def pack(examples: list, seq_len: int, packing: str, say=print) -> list[dict]:
    """Rows of ``seq_len`` tokens: :func:`pack_bfd` (``packing="bfd"``) or :func:`pack_examples`
    (``"wrapped"``). With ``bfd`` an example longer than a row is split into pieces of ``seq_len``
    (each restarting its positions), and how many were split is printed."""
    if packing == "wrapped":
        rows = pack_examples(examples, seq_len)
        tail = sum(len(ids) for ids, _ in examples) - len(rows) * seq_len
        if tail:
            say(f"packing: the last {tail} tokens do not fill a row of {seq_len} and are dropped", flush=True)
        return rows
    long = sum(len(ids) > seq_len for ids, _ in examples)
    if long:
        say(
            f"packing: {long} of {len(examples)} examples are longer than a row of {seq_len} tokens and were split "
            "into pieces that restart positions (set --max-doc-len to choose the piece length)",
            flush=True,
        )
    return pack_bfd(cap_length(examples, seq_len), seq_len)


def pack_bfd(examples: list, seq_len: int) -> list[dict]:
    """Rows of ``seq_len`` tokens holding whole examples, placed best-fit decreasing: longest first,
    each into the open row with the least room that still fits it (a new row when none does). Each
    example restarts ``position_ids`` and its first token is no label; a row's free tail is padding
    (token 0, labels ``-100``, positions restarting at 0, so it attends only to itself). Rows keep the
    order in which they were opened; examples in a row keep their input order.

    Raises:
        ValueError: an example is longer than ``seq_len`` (split it first: :func:`cap_length`).
    """
    import bisect

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))  # stable: ties keep input order
    bins: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        n = len(examples[i][0])
        if n > seq_len:
            raise ValueError(f"an example of {n} tokens does not fit a row of {seq_len}; split it with cap_length")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            room, row = seq_len - n, len(bins) - 1
        else:
            room, row = free.pop(k)
            bins[row].append(i)
            room -= n
        if room:
            bisect.insort(free, (room, row))
    rows = []
    for members in bins:
        ids, labels, pos = [], [], []
        for i in sorted(members):
            e_ids, e_labels = examples[i]
            ids += e_ids
            labels += [IGNORE] + list(e_labels[1:])
            pos += range(len(e_ids))
        pad = seq_len - len(ids)
        ids, labels, pos = ids + [0] * pad, labels + [IGNORE] * pad, pos + list(range(pad))
        rows.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos)})
    return rows


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
