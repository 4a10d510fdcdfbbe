"""Packing documents into long rows whose ``position_ids`` restart at every document.

``shard_batch`` reads the restarts as document boundaries, so no token attends across
documents; the first token of each document is not a label (the previous document's last
token does not predict it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from hf_seqpar.core.sharding import IGNORE_INDEX

__all__ = ["pack_documents", "byte_tokenizer"]


def pack_documents(docs: Iterable[Iterable[int]], seq_len: int) -> Iterator[dict]:
    """Concatenate token documents and cut them into rows of ``seq_len`` tokens.

    Args:
        docs: token ids per document (bytes work too).
        seq_len: tokens per row; the tail that does not fill a row is dropped.

    Yields:
        ``{"input_ids", "labels", "position_ids"}``, each ``(seq_len,)`` int64. Positions restart
        at 0 at every document start; a row that begins inside a document starts that document
        over at 0. Labels are the ids, with ``-100`` at every document's first token.
    """
    ids: list[int] = []
    pos: list[int] = []
    for doc in docs:
        doc = list(doc)
        ids.extend(doc)
        pos.extend(range(len(doc)))
        while len(ids) >= seq_len:
            row_ids, row_pos = torch.tensor(ids[:seq_len]), torch.tensor(pos[:seq_len])
            ids, pos = ids[seq_len:], pos[seq_len:]
            starts = (row_pos == 0).nonzero()
            head = int(starts[0]) if len(starts) else seq_len
            row_pos[:head] -= row_pos[0].clone()
            yield {
                "input_ids": row_ids,
                "labels": row_ids.masked_fill(row_pos == 0, IGNORE_INDEX),
                "position_ids": row_pos,
            }


def byte_tokenizer():
    """A byte-level tokenizer that needs no download: token ``b`` is byte ``b`` (0-255), then
    ``<pad>`` = 256 and ``<eos>`` = 257 (vocabulary 258), for tests and offline recipes.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` (``tokenizer("hé")["input_ids"] == [104, 195, 169]``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # the ByteLevel pre-tokenizer writes every byte as one printable character: printable bytes
    # stand for themselves, the others for the characters from U+0100 on, in byte order
    printable = [b for b in range(256) if chr(b).isprintable() and b not in (32, 127, 173) and not 128 <= b < 161]
    stand_in = iter(range(256, 512))
    vocab = {(chr(b) if b in printable else chr(next(stand_in))): b for b in range(256)}
    vocab.update({"<pad>": 256, "<eos>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
