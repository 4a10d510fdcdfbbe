"""Rank-side cases for the Trainer integration (hf_seqpar.integrations.trainer): refusals, the token count
under left padding, exact resume, padding-free batch keys, and TRL's SFTTrainer against the
one-process SFTTrainer (``trl_sft_run`` runs both: in the test process without SP, on the ranks with SP)."""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from cases import TRAINER_ARGS, VOCAB, tiny_model

import hf_seqpar
from hf_seqpar.core.mesh import unwrap_model


def reset_accelerate(use_cpu_env: bool = True) -> None:
    """Forget accelerate's process-wide state, so the next Trainer builds its Accelerator afresh."""
    from accelerate.state import AcceleratorState, GradientState

    if use_cpu_env:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    else:
        os.environ.pop("ACCELERATE_USE_CPU", None)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _args(out_dir: str, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=out_dir,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=2,
        **TRAINER_ARGS,
        weight_decay=0.0,
        max_grad_norm=0.0,
        remove_unused_columns=False,
    )
    return TrainingArguments(**{**base, **kw})


def _dataset(rows):
    from datasets import Dataset

    return Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])


def random_rows(n: int, seq: int = 19, seed: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, VOCAB, (n, seq), generator=g)]


# ---- point 1 and item 7: refusals at construction ------------------------------------------


def refusals(out_dir: str) -> dict:
    """Construct SequenceParallelTrainer in set-ups it cannot make exact; return each message
    (None = constructed). The recommended fix (use_cpu=True) must construct a MULTI_CPU trainer."""
    ds = _dataset(random_rows(4))
    out = {}

    def attempt(name, args, **kw):
        model = tiny_model(heads=4, kv_heads=2)
        try:
            trainer = hf_seqpar.SequenceParallelTrainer(model=model, args=args, train_dataset=ds, **kw)
        except (RuntimeError, ValueError) as e:
            out[name] = str(e)
            return None
        out[name] = None
        return trainer

    reset_accelerate(use_cpu_env=False)
    attempt("not_distributed", _args(out_dir, use_cpu=False))
    reset_accelerate(use_cpu_env=False)
    fixed = attempt("use_cpu", _args(out_dir, use_cpu=True))
    out["use_cpu_type"] = str(fixed.accelerator.distributed_type) if fixed is not None else None
    if fixed is not None:
        hf_seqpar.disable_sequence_parallel(fixed.model)
    reset_accelerate()
    attempt("label_smoothing", _args(out_dir, label_smoothing_factor=0.1))
    reset_accelerate()
    attempt("compute_loss_func", _args(out_dir), compute_loss_func=lambda outputs, labels, num_items_in_batch=None: 0)
    # evaluate() before train(): accelerate marks the model prepared, and train() would not wrap it in DDP
    reset_accelerate()
    trainer = attempt("eval_first", _args(out_dir), eval_dataset=ds)
    trainer.evaluate()
    try:
        trainer.train()
        out["eval_then_train"] = None
    except RuntimeError as e:
        out["eval_then_train"] = str(e)
    hf_seqpar.disable_sequence_parallel(trainer.model)
    return out


# ---- issue 9 item 6: one rule for the tokens that count (left padding) -----------------------


def left_padding_parity(out_dir: str, steps: int = 2) -> dict:
    """SequenceParallelTrainer on left-padded rows (labels -100 at padding) against the unsharded
    model scored with the same rule (``next_token_labels``: a padding position predicts nothing)."""
    from hf_seqpar.core.sharding import IGNORE_INDEX, count_label_tokens, next_token_labels

    reset_accelerate()
    rows = random_rows(2 * steps + 4, seq=17, seed=5)
    for i, r in enumerate(rows):
        npad = 1 + i % 5
        r["attention_mask"] = torch.ones_like(r["input_ids"])
        r["attention_mask"][:npad] = 0
        r["labels"][:npad] = IGNORE_INDEX
    train, evalr = rows[: 2 * steps], rows[2 * steps :]
    model = tiny_model(heads=4, kv_heads=2)
    reference = copy.deepcopy(model)
    trainer = hf_seqpar.SequenceParallelTrainer(
        model=model, args=_args(out_dir, max_steps=steps), train_dataset=_dataset(train), eval_dataset=_dataset(evalr)
    )
    stack = lambda rs: {k: torch.stack([r[k] for r in rs]) for k in rs[0]}  # noqa: E731

    def ref_loss(b):
        shift = next_token_labels(b["labels"], b["attention_mask"])
        n = count_label_tokens(b)
        return reference(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            labels=b["labels"],
            shift_labels=shift,
            num_items_in_batch=n,
            use_cache=False,
        ).loss

    counts = {
        "trainer": int(trainer._label_tokens([stack(evalr[:2])])),
        "stock_rule": int((stack(evalr[:2])["labels"][:, 1:] != IGNORE_INDEX).sum()),
        "shard_batch": None,
    }
    local = hf_seqpar.shard_batch(stack(evalr[:2]), trainer.model)
    mine = (local["shift_labels"] != IGNORE_INDEX).sum()
    dist.all_reduce(mine)
    counts["shard_batch"] = int(mine)

    trainer.train()  # before evaluate(): see test_evaluate_before_train_is_refused
    order = list(torch.utils.data.RandomSampler(train, generator=torch.Generator().manual_seed(0)))
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    for s in range(steps):
        ref_loss(stack([train[i] for i in order[2 * s : 2 * s + 2]])).backward()
        opt.step()
        opt.zero_grad()
    metrics = trainer.evaluate()
    reference.eval()
    with torch.no_grad():
        ev = [float(ref_loss(stack(evalr[i : i + 2]))) for i in range(0, len(evalr), 2)]
    from cases_accel import _params_err

    result = {
        "counts": counts,
        "eval": abs(metrics["eval_loss"] - sum(ev) / len(ev)) / (sum(ev) / len(ev)),
        "param": _params_err(trainer.model, reference),
    }
    hf_seqpar.disable_sequence_parallel(trainer.model)
    return result


# ---- point 4: exact resume --------------------------------------------------------------------


def resume_run(out_dir: str, resume: bool, steps: int = 8, n_rows: int = 6) -> dict:
    """SequenceParallelTrainer, 3 steps per epoch, AdamW; checkpoint at step 5 (epoch 2). With
    ``resume``: a fresh trainer resumes from that checkpoint. Returns per-step losses, the final
    parameters, and the order of the rows the train loader gives in epochs 0 and 1."""
    reset_accelerate()
    rows = random_rows(n_rows, seq=15, seed=11)
    for i, r in enumerate(rows):
        r["input_ids"][0] = i  # row id, to read the loader's order back
    model = tiny_model(heads=4, kv_heads=2)
    args = _args(
        out_dir,
        max_steps=steps,
        optim="adamw_torch",
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=5,
        max_grad_norm=1.0,
    )
    trainer = hf_seqpar.SequenceParallelTrainer(model=model, args=args, train_dataset=_dataset(rows))
    loader = trainer.get_train_dataloader()
    orders = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        orders.append([int(i) for b in loader for i in b["input_ids"][:, 0]])
    trainer.train(resume_from_checkpoint=os.path.join(out_dir, "checkpoint-5") if resume else None)
    dist.barrier()
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    params = {n: p.detach().clone() for n, p in unwrap_model(trainer.model).named_parameters()}
    hf_seqpar.disable_sequence_parallel(trainer.model)
    return {"losses": losses, "params": params, "orders": orders}


def stock_orders(out_dir: str, n_rows: int = 6) -> list[list[int]]:
    """The stock ``Trainer``'s train-loader order in epochs 0 and 1 (one process), same args."""
    from transformers import Trainer

    reset_accelerate()
    rows = random_rows(n_rows, seq=15, seed=11)
    for i, r in enumerate(rows):
        r["input_ids"][0] = i
    trainer = Trainer(
        model=tiny_model(heads=4, kv_heads=2), args=_args(out_dir, max_steps=8), train_dataset=_dataset(rows)
    )
    loader = trainer.get_train_dataloader()
    orders = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        orders.append([int(i) for b in loader for i in b["input_ids"][:, 0]])
    return orders


# ---- point 2: padding-free batch keys ----------------------------------------------------------


def varlen_keys() -> dict:
    """A TRL padding-free batch (cu_seq_lens_q/k, max_length_q/k, seq_idx) shards like the same
    batch without those keys; keys that disagree with position_ids are refused."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = hf_seqpar.enable_sequence_parallel(tiny_model(heads=4, kv_heads=2), "ulysses")
    g = torch.Generator().manual_seed(1)
    examples = [{"input_ids": torch.randint(0, VOCAB, (n,), generator=g).tolist()} for n in (5, 9, 4)]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    out = {"keys": sorted(batch)}
    plain = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    local, ref = hf_seqpar.shard_batch(batch, model), hf_seqpar.shard_batch(plain, model)
    out["same"] = sorted(local) == sorted(ref) and all(
        torch.equal(local[k], ref[k]) for k in ref if torch.is_tensor(ref[k])
    )
    with torch.no_grad():
        out["logits_equal"] = torch.equal(model(**local).logits, model(**ref).logits)
    errors = {}
    for key, bad in (
        ("cu_seq_lens_q", torch.tensor([0, 5, 18], dtype=torch.int32)),
        ("max_length_k", 7),
        ("seq_idx", torch.zeros_like(batch["seq_idx"])),
    ):
        try:
            hf_seqpar.shard_batch({**batch, key: bad}, model)
            errors[key] = None
        except ValueError as e:
            errors[key] = str(e)
    out["errors"] = errors
    hf_seqpar.disable_sequence_parallel(model)
    return out


# ---- issue 19 points 1, 2, 7 and issue 25's throughput: predict, compute_metrics, streaming ------


def pad_collate(features) -> dict:
    """Right padding to the longest row: input_ids 0, labels -100, attention_mask."""
    n = max(len(f["input_ids"]) for f in features)
    out = {"input_ids": [], "labels": [], "attention_mask": []}
    for f in features:
        ids, k = [int(i) for i in f["input_ids"]], n - len(f["input_ids"])
        out["input_ids"].append(ids + [0] * k)
        out["labels"].append([int(i) for i in f["labels"]] + [-100] * k)
        out["attention_mask"].append([1] * len(ids) + [0] * k)
    return {key: torch.tensor(v) for key, v in out.items()}


def varied_rows(n: int, seed: int) -> list[dict]:
    """``n`` rows of 9..22 tokens (a new length almost every row), some labels ignored."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (9 + (5 * i) % 14,), generator=g)
        labels = ids.clone()
        labels[: 1 + i % 3] = -100  # a prompt that is not scored
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _row_metrics(p) -> dict:
    """What compute_metrics sees: the row count, the scored label tokens and a row-aligned checksum."""
    import numpy as np

    labels = p.label_ids
    scored = labels != -100
    return {
        "rows": int(labels.shape[0]),
        "label_tokens": int(scored.sum()),
        "row_checksum": float(np.sum(np.where(scored, labels, 0) * np.arange(1, labels.shape[0] + 1)[:, None])),
    }


def trainer_paths(out_dir: str, sp: bool, steps: int = 2, stream: bool = True) -> dict:
    """Train on a ``datasets`` iterable (streaming-style) dataset, then evaluate() and predict()
    with compute_metrics; ``sp``: SequenceParallelTrainer on the ranks, else the stock one-process
    Trainer. Returns the losses, final weights, train throughput, metrics and predictions, and (SP)
    whether a batch that differs between the SP ranks after those loaders is refused."""
    from transformers import Trainer

    reset_accelerate()
    train = _dataset(random_rows(2 * steps, seq=15, seed=7))
    train = train.to_iterable_dataset() if stream else train
    evals, tests = _dataset(varied_rows(6, seed=8)), _dataset(varied_rows(6, seed=9))
    args = _args(out_dir, max_steps=steps, include_num_input_tokens_seen="all")
    kw = dict(
        model=tiny_model(heads=4, kv_heads=2),
        args=args,
        train_dataset=train,
        eval_dataset=evals,
        data_collator=pad_collate,
        compute_metrics=_row_metrics,
    )
    trainer = hf_seqpar.SequenceParallelTrainer(**kw) if sp else Trainer(**kw)
    out = {"train": trainer.train().metrics}
    out["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out["tokens_seen"] = trainer.state.num_input_tokens_seen
    out["eval"] = trainer.evaluate()
    pred = trainer.predict(tests)
    out.update(
        predictions=torch.as_tensor(pred.predictions), label_ids=torch.as_tensor(pred.label_ids), test=pred.metrics
    )
    base = unwrap_model(trainer.model)
    out["params"] = {n: p.detach().clone() for n, p in base.named_parameters()}
    if sp:
        rank = dist.get_rank()
        bad = pad_collate(varied_rows(2, seed=20 + rank))  # same shape, other tokens on each rank
        bad["input_ids"] = bad["input_ids"][:, :9]
        bad["labels"], bad["attention_mask"] = bad["labels"][:, :9], bad["attention_mask"][:, :9]
        try:
            trainer.prediction_step(trainer.model, bad, prediction_loss_only=True)
            out["mismatch"] = None
        except hf_seqpar.BatchMismatchError as e:
            out["mismatch"] = str(e)
        # a host's own loader (built with accelerator.prepare, not the mixin's construction) is refused
        try:
            trainer._sp_own(
                trainer.accelerator.prepare(torch.utils.data.DataLoader(tests, batch_size=2)), "get_test_dataloader"
            )
            out["own_loader"] = None
        except NotImplementedError as e:
            out["own_loader"] = str(e)
        hf_seqpar.disable_sequence_parallel(trainer.model)
    return out
