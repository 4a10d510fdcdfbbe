"""TRL's fused LM-head call, sharded by sequence: the one model call TRL's DPO and GRPO trainers score with.

TRL 1.x computes per-token log-probs (and the entropy, mean logits and top-1 flags its trainers
log) through ``model(input_ids, attention_mask, labels, fused_lm_head=True)``, the forward its
``add_fused_lm_head`` installs on the model instance; it returns per-token fields of shape
``(B, S - 1)`` and everything the trainers do afterwards (DPO's loss types, GRPO's ratios, KL and
normalisations, the metrics) is arithmetic on those tensors. :func:`install_sharded_fused_forward`
wraps that forward so that a ``fused_lm_head=True`` call with the *full* batch

* is sharded with :func:`hf_seqpar.shard_batch` (labels shifted on the full sequence, so no label
  is lost at a shard boundary; padding left or right),
* is scored on the local shard by TRL's own fused head (its pre-shifted ``shift_labels`` path;
  never ``S x vocab`` logits), and
* has every per-token field gathered back into ``(B, S - 1)`` in the original order with
  :func:`hf_seqpar.core.logprobs.gather_tokens`.

Every rank of an SP group then computes the trainer's own loss and metrics on identical full
per-token tensors; the gather's backward sums the ranks' gradients, so each rank's gradient is
``sp`` times its share and DDP's mean over ``dp x sp`` ranks is the one-process gradient (the
convention of :mod:`hf_seqpar.core.logprobs`). Every other call (``generate``, a plain forward)
goes to TRL's forward unchanged.
"""

from __future__ import annotations

import types

from hf_seqpar.core.hooks import SHARDS_ITSELF
from hf_seqpar.core.logprobs import gather_tokens
from hf_seqpar.core.sharding import shard_batch

__all__ = ["install_sharded_fused_forward", "TOKEN_FIELDS", "TEXT_KWARGS"]

_MARK = "_hf_seqpar_fused_forward"
#: per-token fields of TRL's FusedCausalLMOutput
TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")
#: keyword arguments TRL's DPOTrainer and GRPOTrainer pass to the fused forward on text rows
#: (anything else, e.g. images or MoE router logits, is refused)
TEXT_KWARGS = {"input_ids", "attention_mask", "use_cache"}


def _sharded_fused_forward(inner):
    """An instance ``forward`` that shards a full-batch ``fused_lm_head=True`` call and gathers the
    per-token outputs back; every other call goes to ``inner`` (TRL's forward) unchanged."""

    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head or "seqpar" in kwargs:
            return inner(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        extra = sorted(k for k, v in kwargs.items() if k not in TEXT_KWARGS and v is not None)
        if args or labels is None or extra:
            raise ValueError(
                f"the sequence-parallel fused LM head takes keyword input_ids, attention_mask and labels; got "
                f"{len(args)} positional argument(s), labels={'set' if labels is not None else None}, other keys "
                f"{extra}. It serves TRL's DPOTrainer and GRPOTrainer forwards (text only, padded rows)."
            )
        full = {"input_ids": kwargs["input_ids"], "labels": labels}
        if kwargs.get("attention_mask") is not None:
            full["attention_mask"] = kwargs["attention_mask"]
        local = shard_batch(full, self)
        batch = local["seqpar"]
        out = inner(
            input_ids=local["input_ids"],
            position_ids=local["position_ids"],
            seqpar=batch,
            shift_labels=local["shift_labels"],
            labels=local["labels"],
            fused_lm_head=True,
            use_cache=False,
        )
        state = batch.state
        for name in TOKEN_FIELDS:
            value = getattr(out, name, None)
            if value is not None:
                # (B, S_local) -> (B, S) in token order; drop the last position (it predicts nothing),
                # giving TRL's unsharded (B, S - 1)
                setattr(
                    out, name, gather_tokens(value, batch.layout, state.sp_rank, state.sp_group, state.counter)[:, :-1]
                )
        out.loss = -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)
        return out

    forward._hf_seqpar_inner = inner
    setattr(forward, SHARDS_ITSELF, True)  # the model's pre-hook lets its full-batch call through
    return forward


def install_sharded_fused_forward(model, trainer_name: str = "the TRL trainer") -> None:
    """Wrap the fused forward TRL's ``add_fused_lm_head`` set on ``model`` (see the module doc); idempotent.

    Args:
        model: the unwrapped model (policy or reference) TRL added its fused head to.
        trainer_name: named in the error.

    Raises:
        ValueError: ``model`` has no TRL fused forward (an instance ``forward``).
    """
    inner = vars(model).get("forward")
    if inner is None:
        raise ValueError(
            f"{type(model).__name__} has no instance forward from TRL's add_fused_lm_head; "
            f"build {trainer_name} before applying sequence parallelism"
        )
    if getattr(inner, _MARK, False):
        return
    wrapped = types.MethodType(_sharded_fused_forward(inner), model)
    model.forward = wrapped
    setattr(model.forward.__func__, _MARK, True)
