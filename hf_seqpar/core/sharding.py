"""Shard a full batch by sequence (the third stage, after building the mesh and applying SP), and
gather sequence-sharded tensors back.

``shard_batch`` sees the whole batch (identical on every rank of an SP group), so everything
about the global structure (positions, padding, documents, label shift, token count) is computed
here once, without communication, and travels with the local batch to the attention hook and
the loss in a :class:`SeqParBatch` (the ``seqpar=`` keyword of the model's forward).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from hf_seqpar.core.comm import all_gather_concat, all_gather_object_fingerprints
from hf_seqpar.core.layout import Layout
from hf_seqpar.core.masks import document_ids
from hf_seqpar.core.mesh import SeqParState, find_state
from hf_seqpar.core.segments import Segments, build_segments

__all__ = [
    "SeqParBatch",
    "shard_batch",
    "gather_sequence",
    "next_token_labels",
    "count_label_tokens",
    "IGNORE_INDEX",
    "BatchMismatchError",
]

IGNORE_INDEX = -100
#: Keys of a batch that carry a sequence dimension and are sharded.
SEQ_KEYS = ("input_ids", "inputs_embeds", "labels", "attention_mask", "position_ids")
#: Keys passed through unchanged (no sequence dimension).
PASS_KEYS = ("num_items_in_batch", "output_hidden_states", "output_attentions", "return_dict", "logits_to_keep")
#: Keys of padding-free / packed batches (TRL's collators, transformers' DataCollatorWithFlattening)
#: that restate the documents of ``position_ids``: checked against them, then dropped (the
#: structure reaches the attention in ``seqpar=``).
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


class BatchMismatchError(RuntimeError):
    """Ranks of one SP group received different batches."""


class SeqParBatch:
    """The global structure of one sharded batch, passed to the model as ``seqpar=``.

    Attributes:
        state: the model's :class:`~hf_seqpar.core.mesh.SeqParState`.
        layout: the :class:`~hf_seqpar.core.layout.Layout` used.
        positions: ``(B, S_pad)`` global position ids, padded global order.
        valid: ``(B, S_pad)`` bool, False at user padding and at shard padding.
        doc_ids: ``(B, S_pad)`` document index, or None when no row is packed.
        segments: the runs of valid tokens per document (:class:`~hf_seqpar.core.segments.Segments`),
            built once per batch in O(S); attention plans derive from them without any S x S
            tensor.
    """

    def __init__(self, state: SeqParState, layout: Layout, positions, valid, doc_ids):
        self.state, self.layout = state, layout
        self.positions, self.valid, self.doc_ids = positions, valid, doc_ids
        self._cache: dict = {}

    @property
    def segments(self) -> Segments:
        """The batch's runs of valid tokens per document (built on first use, then shared)."""
        return self.cached(("segments",), lambda: build_segments(self.valid, self.doc_ids))

    def cached(self, key, build: Callable):
        """Build-once storage for masks derived from this batch (shared by all layers)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def to(self, device) -> "SeqParBatch":
        """Move the structure tensors to ``device`` (accelerate and the Trainer call this)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SeqParBatch(self.state, self.layout, move(self.positions), move(self.valid), move(self.doc_ids))

    def __repr__(self) -> str:
        b, s = self.valid.shape
        return f"SeqParBatch(B={b}, S={self.layout.seq_len}, padded={s}, layout={self.layout.kind!r})"


def _require_state(model) -> SeqParState:
    state = find_state(model)
    if state is None:
        raise RuntimeError(
            f"{type(model).__name__} has no sequence parallelism: call "
            "`model = hf_seqpar.enable_sequence_parallel(model, ...)` before shard_batch/gather_sequence."
        )
    return state


def _validate(batch: Mapping[str, Any]) -> tuple[int, int]:
    unknown = [k for k, v in batch.items() if torch.is_tensor(v) and k not in SEQ_KEYS + PASS_KEYS + VARLEN_KEYS]
    if unknown:
        raise ValueError(
            f"shard_batch does not know how to shard batch key(s) {unknown}; it shards {list(SEQ_KEYS)}. "
            "Remove them from the batch (or pass them to the model yourself, sharded)."
        )
    main = batch.get("input_ids", batch.get("inputs_embeds"))
    if main is None:
        raise ValueError("shard_batch needs `input_ids` (B, S) or `inputs_embeds` (B, S, H) in the batch")
    if main.dim() < 2:
        raise ValueError(f"expected a batch dimension and a sequence dimension, got shape {tuple(main.shape)}")
    bsz, seq = main.shape[:2]
    if bsz == 0 or seq == 0:
        raise ValueError(
            f"empty batch: shape {tuple(main.shape)}; every row needs at least one token. Drop empty "
            "batches before shard_batch."
        )
    for key in SEQ_KEYS:
        t = batch.get(key)
        if t is not None and key != "position_ids" and tuple(t.shape[:2]) != (bsz, seq):
            raise ValueError(f"`{key}` has shape {tuple(t.shape)}, but input has (B, S) = {(bsz, seq)}")
    pos = batch.get("position_ids")
    if pos is not None and (pos.shape[-1] != seq or pos.shape[0] not in (1, bsz)):
        raise ValueError(f"`position_ids` has shape {tuple(pos.shape)}; expected ({bsz} or 1, {seq})")
    _check_varlen_keys(batch, bsz, seq)
    return bsz, seq


def _check_varlen_keys(batch: Mapping[str, Any], bsz: int, seq: int) -> None:
    """``cu_seq_lens_q/k``, ``max_length_q/k`` and ``seq_idx`` must describe the documents that
    ``position_ids`` carry (a document starts wherever a position is not the previous plus one;
    the varlen convention runs over the flattened ``B x S`` tokens)."""
    present = [k for k in VARLEN_KEYS if batch.get(k) is not None]
    if not present:
        return
    pos = batch.get("position_ids")
    if pos is None:
        raise ValueError(
            f"the batch has {present} but no `position_ids`; shard_batch reads the documents from "
            "position_ids (restarting at every document): pass them too (TRL's collators do with "
            "padding_free=True or packing=True)"
        )
    pos = pos.expand(bsz, seq)
    starts = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1  # (B, S); every row starts a document
    starts[:, 0] = True
    flat = starts.reshape(-1)
    expected = {"cu": torch.cat([flat.nonzero().flatten(), torch.tensor([flat.numel()], device=flat.device)])}
    expected["max"] = int(expected["cu"].diff().max())
    expected["idx"] = flat.long().cumsum(0) - 1  # (B*S,) document index of every token
    bad = []
    for key in present:
        value = batch[key]
        if key.startswith("cu_seq_lens"):
            ok = torch.is_tensor(value) and torch.equal(value.reshape(-1).long().cpu(), expected["cu"].cpu())
        elif key.startswith("max_length"):
            ok = int(value) == expected["max"]
        else:
            ok = (
                torch.is_tensor(value)
                and value.numel() == flat.numel()
                and torch.equal(value.reshape(-1).long().cpu(), expected["idx"].cpu())
            )
        if not ok:
            bad.append(key)
    if bad:
        raise ValueError(
            f"batch key(s) {bad} disagree with `position_ids`: position_ids give documents starting at flattened "
            f"token(s) {expected['cu'][:-1].tolist()[:16]} (cu_seq_lens {expected['cu'].tolist()[:17]}, longest "
            f"{expected['max']}). Build them from the same position_ids, or drop them (shard_batch derives the "
            "documents from position_ids)."
        )


@functools.lru_cache(maxsize=8)
def _weights(n: int) -> torch.Tensor:
    """Fixed odd position weights, so that swapped tokens change the fingerprint."""
    return (torch.arange(n, dtype=torch.int64) * 2654435761 + 97) % 1000003


def _fingerprint(batch: Mapping[str, Any], bsz: int, seq: int) -> torch.Tensor:
    """A cheap int64 summary of the batch: shapes and position-weighted sums of each key."""
    values = [bsz, seq]
    for key in SEQ_KEYS:
        t = batch.get(key)
        if t is None:
            values.append(-1)
            continue
        flat = t.detach().reshape(-1)
        w = _weights(flat.numel()).to(flat.device)
        if flat.is_floating_point():
            values.append(int((flat.double() * w.double()).sum().item() * 1e6) & ((1 << 62) - 1))
        else:
            values.append(int((flat.long() * w).sum().item()))
    return torch.tensor(values, dtype=torch.int64)


def check_documents(batch: Mapping[str, Any], features=None) -> None:
    """Refuse packed documents that the unsharded transformers model would not separate.

    transformers detects packed documents (``position_ids`` restarting inside a row) only when no
    ``attention_mask`` is given and only if the model hands ``position_ids`` to its mask builder
    (``masking_utils._preprocess_mask_arguments``); otherwise every real token attends across
    documents. hf_seqpar separates documents, so a row whose real tokens (mask 1) span several
    position runs is refused in those two cases. A mask whose real tokens form one run (e.g. left
    padding with positions from ``mask.cumsum(-1) - 1``) means the same in both and passes.

    Args:
        batch: the full batch.
        features: the model's :class:`~hf_seqpar.core.features.AttentionFeatures` (None: a model
            that separates documents).

    Raises:
        ValueError: a row with restarting positions over its real tokens, together with an
            ``attention_mask``, or on a model that does not separate documents.
    """
    pos = batch.get("position_ids")
    if pos is None:
        return
    mask = batch.get("attention_mask")
    separates = features is None or features.separates_documents
    if mask is None and separates:
        return
    main = batch.get("input_ids", batch.get("inputs_embeds"))
    docs = document_ids(pos.expand(main.shape[0], -1))
    if docs is None:
        return
    real = mask.bool() if mask is not None else torch.ones_like(docs, dtype=torch.bool)
    first = docs.masked_fill(~real, torch.iinfo(docs.dtype).max).amin(-1)
    last = docs.masked_fill(~real, -1).amax(-1)
    rows = ((last > first) & real.any(-1)).nonzero().flatten().tolist()
    if not rows:
        return
    if mask is not None:
        raise ValueError(
            f"batch rows {rows} have an `attention_mask` and `position_ids` that restart inside the real tokens "
            "(packed documents). transformers ignores the documents when an attention_mask is given (every token "
            "attends across documents) and separates them only when there is no mask, so the meaning is "
            "ambiguous. To keep the documents apart (the usual intent of packing), drop `attention_mask` from the "
            "batch; padding then needs a position run of its own (positions restarting at 0) so that it forms a "
            "separate document, and labels -100. To attend across documents, pass position_ids that do not restart "
            "(or none)."
        )
    raise ValueError(
        f"batch rows {rows} hold packed documents (`position_ids` restart inside the row), but transformers' "
        f"{features.model_type} builds its attention mask without position_ids, so even unsharded it lets every "
        "token attend across documents, while hf_seqpar would separate them. Pass one document per row (pad the "
        "rows and give an attention_mask), or pass position_ids that do not restart (or none) to attend across "
        "documents."
    )


def _check_same_batch(state: SeqParState, batch, bsz: int, seq: int) -> None:
    fp = _fingerprint(batch, bsz, seq)
    device = "cuda" if state.mesh.device_type == "cuda" else "cpu"
    everyone = all_gather_object_fingerprints(fp.to(device), state.sp_group).cpu()
    differ = [r for r in range(everyone.shape[0]) if not torch.equal(everyone[r], everyone[0])]
    if differ:
        raise BatchMismatchError(
            f"the ranks of one SP group received different batches (SP ranks {differ} differ from SP rank 0; "
            f"shapes {everyone[:, :2].tolist()}). Every rank of an SP group must get the same full batch: shard "
            "the data over data-parallel replicas only (e.g. a DistributedSampler with num_replicas=dp_size, "
            "rank=dp_rank), and seed shuffling identically."
        )
    state.batches_checked += 1


def next_token_labels(labels: torch.Tensor, attention_mask: torch.Tensor | None = None, pad: int = 0) -> torch.Tensor:
    """The target of every position: which tokens count in the loss, in one place.

    Position ``t`` is scored against ``labels[t + 1]``; the last position and every padding
    position (``attention_mask == 0``, e.g. the last left-pad token "predicting" the first real
    token: its hidden state depends on how a kernel treats fully masked rows) predict nothing.

    Args:
        labels: ``(B, S)`` unshifted labels (``-100`` = ignored).
        attention_mask: optional ``(B, S)``, 1 = token, 0 = padding.
        pad: extra ignored positions appended at the end (shard padding).

    Returns:
        ``(B, S + pad)`` shifted labels, ``-100`` where nothing is predicted.
    """
    shifted = F.pad(labels, (0, 1 + pad), value=IGNORE_INDEX)[:, 1:]
    if attention_mask is not None:
        shifted = shifted.masked_fill(~_pad_seq(attention_mask.bool(), pad, False), IGNORE_INDEX)
    return shifted


def count_label_tokens(batch: Mapping[str, Any]) -> torch.Tensor:
    """The number of tokens that count in the loss of a full batch (:func:`next_token_labels`),
    the ``num_items_in_batch`` that ``shard_batch`` and the Trainer integration use.

    Args:
        batch: a full batch with ``labels`` ``(B, S)`` and optional ``attention_mask``.

    Returns:
        A 0-d int64 tensor.
    """
    return (next_token_labels(batch["labels"], batch.get("attention_mask")) != IGNORE_INDEX).sum()


def _pad_seq(t: torch.Tensor, pad: int, value) -> torch.Tensor:
    if pad == 0:
        return t
    if t.dim() == 2:
        return F.pad(t, (0, pad), value=value)
    return F.pad(t, (0, 0, 0, pad), value=value)  # (B, S, H): pad the sequence dim


def shard_batch(batch: Mapping[str, Any], model) -> dict:
    """This rank's sequence shard of a full batch, with everything the forward needs.

    Args:
        batch: the full, unsharded batch, identical on every rank of the SP group: ``input_ids``
            ``(B, S)`` (or ``inputs_embeds`` ``(B, S, H)``), optional ``labels`` ``(B, S)`` (not
            shifted, as for the plain model), ``attention_mask`` ``(B, S)`` (1 = token, 0 = padding,
            left or right), ``position_ids`` ``(B, S)`` (packed documents restart at 0), and
            optionally ``num_items_in_batch``.
        model: a model after :func:`hf_seqpar.enable_sequence_parallel` (any wrapper).

    Returns:
        A dict for ``model(**local)``: the local ``input_ids``/``inputs_embeds``, global
        ``position_ids``, pre-shifted ``labels`` and ``shift_labels`` (so no label is lost at shard
        boundaries), ``num_items_in_batch`` (label tokens of the full batch), ``use_cache=False``,
        and ``seqpar`` (the batch structure). The sequence is padded at the end to the multiple
        the strategy needs; padding is never attended to and never counted in the loss.

    Raises:
        RuntimeError: the model has no SP.
        ValueError: malformed batch (unknown keys, shape mismatch, empty sequence), or an
            ``attention_mask`` together with ``position_ids`` that restart inside its real tokens
            or restarting ``position_ids`` on a model that does not separate documents (see
            :func:`check_documents`).
        BatchMismatchError: ranks of the SP group hold different batches (checked on the first
            call, or every call with ``check_batch="always"``).
    """
    state = _require_state(model)
    bsz, seq = _validate(batch)
    check_documents(batch, state.features)
    mode = state.config.check_batch
    if mode == "always" or (mode == "first" and state.batches_checked == 0):
        _check_same_batch(state, batch, bsz, seq)

    main = batch.get("input_ids", batch.get("inputs_embeds"))
    device = main.device
    user_pos = batch.get("position_ids")
    positions = (user_pos if user_pos is not None else torch.arange(seq, device=device)[None]).expand(bsz, seq)
    mask = batch.get("attention_mask")
    valid = mask.bool() if mask is not None else torch.ones(bsz, seq, dtype=torch.bool, device=device)
    doc_ids = document_ids(positions) if user_pos is not None else None
    # the layout may depend on the rows' documents (ring/hybrid balance their causal work), O(B S)
    layout = state.strategy.make_layout(seq, valid, doc_ids)
    pad = layout.pad

    # shard padding continues each row's positions (its tokens are masked out anyway)
    positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, pad + 1, device=device)], dim=1)
    valid = _pad_seq(valid, pad, False)
    if doc_ids is not None:
        # shard padding forms one more document per row (flash segments keep it apart)
        doc_ids = torch.cat([doc_ids, (doc_ids[:, -1:] + 1).expand(bsz, pad)], dim=1)

    rank = state.sp_rank
    local = {k: v for k, v in batch.items() if k in PASS_KEYS}
    if "input_ids" in batch:
        local["input_ids"] = layout.shard(_pad_seq(batch["input_ids"], pad, 0), rank)
    if "inputs_embeds" in batch:
        local["inputs_embeds"] = layout.shard(_pad_seq(batch["inputs_embeds"], pad, 0.0), rank)
    # the strategy may want other positions than its tokens' own (see Strategy.local_position_ids)
    local["position_ids"] = state.strategy.local_position_ids(positions, layout)
    labels = batch.get("labels")
    if labels is not None:
        # shift on the full sequence, then shard: token t is scored against label t+1 everywhere
        shifted = next_token_labels(labels, mask, pad)
        local_labels = layout.shard(shifted, rank).contiguous()
        local["labels"] = local["shift_labels"] = local_labels
        if "num_items_in_batch" not in local:
            # global token count: each rank's loss is sum/N and the SP group sums them
            local["num_items_in_batch"] = (shifted != IGNORE_INDEX).sum().clamp_min(1)
    local["use_cache"] = False
    local["seqpar"] = SeqParBatch(state, layout, positions, valid, doc_ids)
    state.last_layout = layout
    _note_layout(state, layout)
    return local


def _note_layout(state: SeqParState, layout: Layout) -> None:
    """Remember ``layout`` by its local length; a second, different layout of the same local length
    marks that length ambiguous (None) for :func:`gather_sequence` without a named batch."""
    seen = state.layouts_by_local_len
    if seen.get(layout.local_len, layout) != layout:
        seen[layout.local_len] = None
    elif layout.local_len not in seen:
        seen[layout.local_len] = layout


@torch.compiler.disable  # bookkeeping on Python objects, outside any compiled graph
def record_outputs(module, args, kwargs, output) -> None:
    """Forward hook of an SP model: the output tensors of a forward remember the layout of its
    ``seqpar=`` batch, so that :func:`gather_sequence` of an earlier batch's logits uses that
    batch's layout rather than the latest one."""
    batch = kwargs.get("seqpar")
    if not isinstance(batch, SeqParBatch):
        return
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, tuple) else (output,)
    for value in values:
        for t in value if isinstance(value, tuple) else (value,):
            if torch.is_tensor(t) and t.dim() >= 2:
                batch.state.sharded_outputs[t] = batch.layout


def _resolve(tensor, source, layout, batch) -> tuple[SeqParState, Layout, str]:
    """The state and layout :func:`gather_sequence` uses, and where the layout came from."""
    if isinstance(source, Mapping) or isinstance(source, SeqParBatch):
        batch, source = source, None  # gather_sequence(x, local): the batch names the layout
    if isinstance(batch, Mapping):
        if not isinstance(batch.get("seqpar"), SeqParBatch):
            raise TypeError(
                "gather_sequence(batch=...) takes the dict shard_batch returned (with its `seqpar`) or "
                f"that SeqParBatch; got a mapping with keys {sorted(batch)[:8]}"
            )
        batch = batch["seqpar"]
    state = batch.state if batch is not None else _require_state(source)
    known = state.sharded_outputs.get(tensor)
    named = batch.layout if batch is not None else layout
    if named is not None:
        if known is not None and known != named:
            raise ValueError(
                f"gather_sequence was given the layout of another batch than the one this tensor came from: the "
                f"tensor is an output of a forward on a sequence of {known.seq_len} ({known.kind}, {known.local_len} "
                f"per rank), the named batch has {named.seq_len} ({named.kind}, {named.local_len} per rank). Pass "
                "the dict shard_batch returned for the tensor's own batch (or drop batch=/layout=: model outputs "
                "remember their batch)."
            )
        return state, named, "the named batch" if batch is not None else "layout="
    if known is not None:
        return state, known, "the forward that produced the tensor"
    if state.last_layout is None:
        raise RuntimeError("gather_sequence needs a layout: call shard_batch first (or pass batch=)")
    seen = state.layouts_by_local_len
    if seen.get(state.last_layout.local_len, state.last_layout) is None:
        raise ValueError(
            f"gather_sequence cannot tell which batch this tensor came from: it is not an output of a forward of "
            f"this model, and batches of different lengths were sharded to the same {state.last_layout.local_len} "
            "positions per rank, so the latest batch's layout could be the wrong one (silently wrong tokens). Name "
            "the batch: `local = hf_seqpar.shard_batch(batch, model)` ... `hf_seqpar.gather_sequence(tensor, "
            "model, batch=local)` (or pass `layout=local['seqpar'].layout`)."
        )
    return state, state.last_layout, "the latest shard_batch call"


def gather_sequence(
    tensor: torch.Tensor, model, dim: int = 1, layout: Layout | None = None, *, batch=None
) -> torch.Tensor:
    """The full-sequence tensor from every rank's shard, in original token order.

    Which layout undoes the sharding, first match: ``batch`` (or a batch passed as ``model``);
    ``layout``; the forward that produced ``tensor`` (model outputs remember their batch); the
    latest ``shard_batch`` call, only when no other batch sharded to the same local length (else
    the tensor's batch is ambiguous and this raises rather than guess).

    Args:
        tensor: this rank's shard, e.g. ``out.logits`` ``(B, S_local, V)``.
        model: the SP model, or the dict :func:`shard_batch` returned (or its ``seqpar``).
        dim: the sequence dimension of ``tensor``.
        layout: the :class:`~hf_seqpar.core.layout.Layout` of the batch the tensor came from.
        batch: the dict :func:`shard_batch` returned for the tensor's batch, or its
            :class:`SeqParBatch` (``local["seqpar"]``).

    Returns:
        A plain (detached) tensor with the sequence dimension of the original batch: shard
        padding removed, layout undone.

    Raises:
        RuntimeError: the model has no SP, or no batch was sharded yet.
        ValueError: the tensor's sequence length does not match the layout, or the tensor's batch
            is ambiguous (name it with ``batch=``).
    """
    state, layout, source = _resolve(tensor, model, layout, batch)
    dim = dim % tensor.dim()
    if tensor.shape[dim] != layout.local_len:
        raise ValueError(
            f"tensor has {tensor.shape[dim]} positions along dim {dim}, but the layout of {source} holds "
            f"{layout.local_len} per rank (sequence {layout.seq_len} padded to {layout.padded_len} over "
            f"{layout.sp_size} ranks); pass the tensor's own batch: gather_sequence(tensor, model, batch=local) "
            "with `local` the dict shard_batch returned for it"
        )
    full = all_gather_concat(tensor, dim, state.sp_group, state.counter)
    return layout.unshard(full, dim)
