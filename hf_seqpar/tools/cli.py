"""The ``hf-seqpar`` command: ``bench``, ``plan``, ``selftest`` and ``launch``.

Only the standard library is imported at module level: each command imports what it needs, so
``hf-seqpar --help`` and ``--version`` do not import torch or transformers.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _float_above(low: float, inclusive: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value >= low if inclusive else value > low):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low:g}, got {text}")
        return value

    return parse


_positive_float = _float_above(0.0, inclusive=False)
_nonnegative_float = _float_above(0.0, inclusive=True)


def _ints(text: str) -> list[int]:
    values = [_positive_int(x) for x in text.split(",") if x]
    if not values:
        raise argparse.ArgumentTypeError("give at least one positive integer (comma-separated)")
    return values


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="measure strategies: time, per-rank memory, traffic vs theory",
        description="Forward+backward steps of a Llama-style model (random weights built from a "
        "config) per strategy, world size and sequence length. Spawns its own ranks "
        "(gloo on CPU, NCCL on GPUs), or runs in place under torchrun.",
    )
    p.add_argument(
        "--model",
        default="tiny",
        help="preset (tiny, llama-3.1-8b, llama-3.1-70b, llama-3.1-405b), "
        "config.json, model folder or Hub name (default: %(default)s)",
    )
    p.add_argument("--layers", type=_positive_int, help="override the number of layers")
    p.add_argument("--strategies", type=_names, default=["ulysses", "ring"], help="comma list (default: ulysses,ring)")
    p.add_argument("--world", type=_ints, default=[2], help="comma list of rank counts (default: 2)")
    p.add_argument("--seq-lens", type=_ints, default=[1024, 2048], help="comma list (default: 1024,2048)")
    p.add_argument("--batch", type=_positive_int, default=1, help="rows per step (default: %(default)s)")
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=5,
        help="timed steps; min, median and max step time are reported (default: %(default)s)",
    )
    p.add_argument("--warmup", type=_nonnegative_int, default=2, help="untimed steps first (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--ulysses-size", type=_positive_int, help="hybrid's Ulysses degree")
    p.add_argument("--no-baselines", action="store_true", help="skip the plain model and the P=1 runs")
    p.add_argument(
        "--peak-tflops",
        type=_positive_float,
        default=None,
        help="GPU dense bf16 peak for MFU (default: by the device name, e.g. H100/H200 989, A100 312; "
        "an unknown device gets tokens/s only)",
    )
    p.add_argument("--json", help="write one row per configuration to this file")
    p.add_argument(
        "--plot",
        help="write memory and step time to this PNG: lines against sequence length, or "
        "bars per configuration when one length is measured",
    )
    g = p.add_argument_group("row structures (per-rank step memory against S; CPU/gloo, fresh ranks per row)")
    g.add_argument(
        "--rows",
        type=_names,
        default=None,
        help="measure these row structures instead: comma list of single, packed, padded, window, "
        "short (plain rows of --doc-len tokens, the same tokens per step); prints memory growth "
        "S^x between lengths and each structure against single (hybrid runs on 4 ranks)",
    )
    g.add_argument(
        "--scaling",
        action="store_true",
        help="measure the speed-up from 1 to P ranks instead: per-step wall time and each rank's CPU "
        "time (its own compute) for --strategies x --world x --rows (single, skewed, longtail) x "
        "--layouts, fresh ranks per point, with the layout's per-rank attention work",
    )
    g.add_argument(
        "--layouts",
        type=_names,
        default=["auto"],
        help="ring/hybrid layouts for --scaling: comma list of auto, zigzag, balanced, contiguous (default: auto)",
    )
    g.add_argument("--doc-len", type=_positive_int, default=1024, help="document length of packed rows (default: 1024)")
    g.add_argument("--window", type=_positive_int, default=1024, help="sliding window of window rows (default: 1024)")
    g.add_argument("--pad-frac", type=float, default=0.125, help="right padding of padded rows (default: 0.125)")
    k = p.add_argument_group("attention kernels (per-device speed table; hf_seqpar.tools.kernelbench)")
    k.add_argument(
        "--kernels",
        action="store_true",
        help="measure forward+backward TFLOP/s of every CUDA attention backend instead (causal and packed "
        "rows, Llama-3.1-8B heads, bf16), each checked against the float64 reference; prints the table "
        "and the default order it gives, writes --json (default kernel-speed-<device>.json). "
        "Without CUDA it exits 2 (--device cpu: the CPU kernel, a smoke test)",
    )
    k.add_argument(
        "--kernel-lengths",
        type=_ints,
        default=[8192, 32768, 131072],
        help="row lengths for --kernels (default: 8192,32768,131072)",
    )
    k.add_argument(
        "--kernel-backends", type=_names, default=None, help="backends for --kernels (default: all available)"
    )
    k.add_argument("--kernel-cases", type=_names, default=["causal", "packed"], help="causal,packed (default: both)")
    k.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="--kernels device (default: cuda)")
    k.add_argument("--time-limit", type=_positive_float, default=None, help="--kernels: stop after this many seconds")


def _plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="predict memory and traffic per strategy; recommend one",
        description="Predicts per-GPU memory (model states, activations, logits) and SP traffic "
        "for every strategy and degree split of a model on a cluster, and recommends "
        "the smallest SP degree that fits (the most data parallelism; then the least "
        "traffic time). The header lists what the prediction assumes.",
    )
    p.add_argument(
        "--model", default="llama-3.1-8b", help="preset, config.json, model folder or Hub name (default: %(default)s)"
    )
    p.add_argument("--seq-len", type=_positive_int, default=131072, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--gpus", type=_positive_int, default=8, help="GPUs in total (default: %(default)s)")
    p.add_argument("--gpu-mem", type=_positive_float, default=80.0, help="GiB per GPU (default: %(default)s)")
    p.add_argument(
        "--reserve",
        type=_nonnegative_float,
        default=4.0,
        help="GiB per GPU kept out of the budget for the CUDA context, NCCL buffers and kernel "
        "workspaces; the budget is --gpu-mem minus this (default: %(default)s)",
    )
    p.add_argument("--gpus-per-node", type=_positive_int, default=8, help="GPUs per node (default: %(default)s)")
    p.add_argument(
        "--intra-bw", type=_positive_float, default=450.0, help="GB/s per GPU inside a node (default: %(default)s)"
    )
    p.add_argument(
        "--inter-bw", type=_positive_float, default=50.0, help="GB/s per GPU across nodes (default: %(default)s)"
    )
    p.add_argument(
        "--sharding",
        default=None,
        choices=["none", "zero1", "zero2", "fsdp", "fsdp_offload"],
        help="model-state sharding; fsdp_offload keeps the sharded states in host memory (accelerate's "
        "fsdp_offload_params: true), as one GPU needs for an 8B model (default: fsdp; --max-seq without "
        "--sharding searches fsdp and fsdp_offload and says which it chose)",
    )
    p.add_argument("--no-checkpointing", action="store_true", help="predict without activation checkpointing")
    p.add_argument("--no-chunked-loss", action="store_true", help="predict with full fp32 logits")
    p.add_argument(
        "--loss-chunk", type=_positive_int, default=4096, help="tokens per loss chunk (default: %(default)s)"
    )
    p.add_argument("--offload", action="store_true", help="predict with offload_checkpoints (host memory)")
    p.add_argument("--mlp-tiles", type=_positive_int, default=None, help="predict with this many MLP tiles")
    p.add_argument("--batch", type=_positive_int, default=1, help="rows per micro-batch (default: %(default)s)")
    p.add_argument(
        "--optimizer",
        default="adamw",
        choices=["adamw", "sgd"],
        help="optimizer of the model states: adamw 12, sgd 4 bytes of state per trained parameter, "
        "beside 2 B weights and 2 B gradients (default: %(default)s)",
    )
    p.add_argument(
        "--optim-bytes",
        type=_nonnegative_float,
        default=None,
        help="optimizer-state bytes per trained parameter, fp32 master copy included, instead of the "
        "optimizer's (e.g. 6 for 8-bit Adam with an fp32 master copy)",
    )
    trained = p.add_mutually_exclusive_group()
    trained.add_argument(
        "--lora-rank",
        type=_positive_int,
        default=None,
        help="train a LoRA adapter of this rank on every attention and MLP projection (the "
        "recipe's --lora-targets default); the base weights are frozen",
    )
    trained.add_argument(
        "--trainable-params",
        type=float,
        default=None,
        help="parameters that train (adapters of any kind, e.g. 4.2e7); the rest are frozen",
    )
    p.add_argument(
        "--host-mem",
        type=_positive_float,
        default=1900.0,
        help="GiB of host memory per node the job may fill with offloaded checkpoints/states (default: "
        "%(default)s, a 2 TiB 8 x H100 node less ~150 GiB for the OS and data loading)",
    )
    p.add_argument(
        "--tflops",
        type=_positive_float,
        default=989.0,
        help="dense bf16 TFLOP/s per GPU for the attention time (default: H100 %(default)s)",
    )
    p.add_argument(
        "--attn-mfu",
        type=_positive_float,
        default=0.5,
        help="share of --tflops the attention kernels reach (default: %(default)s)",
    )
    p.add_argument(
        "--max-step-s",
        type=_positive_float,
        default=None,
        help="longest acceptable attention time per step, seconds: --max-seq then also stops where "
        "attention alone would take longer (default: no limit; --max-seq answers the memory question "
        "and prints the predicted attention time)",
    )
    p.add_argument(
        "--max-seq",
        action="store_true",
        help="also report the longest sequence each candidate fits with these features, and the "
        "longest over all candidates using every GPU, every memory-feature setting and (without "
        "--sharding) the states on the GPUs or in host memory, with the constraint that binds it, "
        "the sharding and the plugin YAML",
    )
    p.add_argument(
        "--rows",
        default="single",
        choices=["single", "skewed", "longtail"],
        help="row whose per-rank attention work (max/mean) is predicted for ring/hybrid: one document, "
        "skewed (3/4 one document, the rest S/32-token ones) or longtail (Pareto document lengths, "
        "seed 0) (default: %(default)s)",
    )
    p.add_argument("--json", help="write the candidates to this file")
    p.add_argument(
        "--inference",
        action="store_true",
        help="plan hf_seqpar.generate instead of training: weights + sharded KV cache + prefill working "
        "set per GPU, and the longest prompt per candidate (hf_seqpar/tools/plan_infer.py)",
    )
    p.add_argument(
        "--new-tokens", type=_positive_int, default=32, help="--inference: tokens generated (default: %(default)s)"
    )
    post = p.add_argument_group(
        "post-training (TRL's DPOTrainer / GRPOTrainer; hf_seqpar/tools/plan_post.py)",
        "The rows, TRL's fused LM head, the reference model and GRPO's generation; the table's total is "
        "the largest phase (training step, reference forward, generation, scoring, precompute).",
    )
    post.add_argument(
        "--post-training",
        choices=["dpo", "grpo"],
        default=None,
        help="dpo: --batch pairs per micro-batch, i.e. 2 x --batch rows of --seq-len (chosen + rejected); "
        "grpo: --batch completion rows of --seq-len (prompt + completion) per micro-batch",
    )
    post.add_argument(
        "--ref-model",
        choices=["none", "same", "precompute"],
        default=None,
        help="same: a frozen copy of the model as the reference (DPO ref_model, GRPO beta > 0), sharded "
        "like the states under FSDP, replicated otherwise, with a no-grad forward per step; none: no "
        "reference (GRPO beta = 0); precompute: DPO's precompute_ref_log_probs (a whole-row pass "
        "before training) (default: same)",
    )
    post.add_argument(
        "--ref-bytes",
        type=int,
        choices=[2, 4],
        default=None,
        help="bytes per reference weight: 2 (bf16) or 4 (an fp32 copy, e.g. copy.deepcopy of an fp32 "
        "policy as recipes/dpo_trl.py does) (default: 2)",
    )
    post.add_argument(
        "--num-generations",
        type=_positive_int,
        default=None,
        help="grpo: completions per prompt (TRL's num_generations; no memory term of its own: --batch "
        "counts completion rows) (default: 8)",
    )
    post.add_argument(
        "--prompt-len", type=_positive_int, default=None, help="grpo: prompt tokens of each --seq-len row (required)"
    )
    post.add_argument(
        "--steps-per-generation",
        type=_positive_int,
        default=None,
        help="grpo: micro-batches one generation serves (TRL's steps_per_generation): the generating rank "
        "holds the KV cache of --batch x this many whole rows (default: 1)",
    )
    post.add_argument(
        "--generation",
        choices=["hf", "external"],
        default=None,
        help="grpo: hf = HF generate on the training GPUs (modelled: KV cache, prefill, logits); external = "
        "a vLLM server on other GPUs (nothing on these) (default: hf)",
    )


def _bench_rows(args) -> int:
    from hf_seqpar.tools.rowbench import ROW_KINDS, RowSpec, format_rows, growth_table, measure_rows

    unknown = sorted(set(args.rows) - set(ROW_KINDS))
    if unknown:
        args.parser.error(f"--rows {unknown}: valid row structures are {list(ROW_KINDS)}")
    if not 0 <= args.pad_frac < 1:
        args.parser.error(f"--pad-frac must be in [0, 1), got {args.pad_frac}")
    from hf_seqpar.strategies import strategy_class

    rows = []
    for strategy in args.strategies:
        # a strategy that needs more ranks to show everything it does (hybrid: 2 x 2) says so
        world = max(args.world[0], strategy_class(strategy).bench_world) if strategy != "none" else args.world[0]
        for kind in args.rows:
            for n in args.seq_lens:
                row = measure_rows(
                    RowSpec(strategy, world, n, kind, args.doc_len, args.window, args.pad_frac, layers=args.layers or 1)
                )
                print(
                    f"{strategy} P={world} {kind} S={n}: {row['peak_mib']:.1f} MiB/rank, {row['seconds']:.2f} s",
                    flush=True,
                )
                rows.append(row)
    rows = growth_table(rows)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _bench_scaling(args) -> int:
    from hf_seqpar.config import LAYOUTS
    from hf_seqpar.tools.rowbench import ROW_KINDS
    from hf_seqpar.tools.scaling import ScalingSpec, format_scaling, measure_scaling

    kinds = args.rows or ["single", "skewed", "longtail"]
    bad = sorted(set(kinds) - set(ROW_KINDS)) + sorted(set(args.layouts) - set(LAYOUTS))
    if bad:
        args.parser.error(f"{bad}: --rows takes {list(ROW_KINDS)}, --layouts {list(LAYOUTS)}")
    from dataclasses import fields

    from hf_seqpar.strategies import strategy_class

    rows = []
    for strategy in args.strategies:
        takes = {f.name for f in fields(strategy_class(strategy).Options)}  # the options it takes
        layouts = args.layouts if "layout" in takes else [None]
        options = (("ulysses_size", args.ulysses_size),) if args.ulysses_size and "ulysses_size" in takes else ()
        for kind in kinds:
            for n in args.seq_lens:
                for i, layout in enumerate(layouts):
                    for world in args.world:
                        if world == 1 and i:
                            continue  # one rank: the layout does not matter, measured once
                        opts = options if world > 1 else ()
                        spec = ScalingSpec(
                            strategy,
                            world,
                            kind,
                            n,
                            None if layout == "auto" else layout,
                            args.model,
                            args.layers,
                            args.steps,
                            args.warmup,
                            opts,
                        )
                        row = measure_scaling(spec)
                        print(
                            f"{strategy} P={world} {kind} S={n} layout={layout} ({row['layout_used']}): "
                            f"wall {row['wall_s']:.2f} s, CPU per rank {row['cpu_s_per_rank']}",
                            flush=True,
                        )
                        rows.append(row)
    print(format_scaling(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _bench_kernels(args) -> int:
    from hf_seqpar.tools import kernelbench

    argv = ["--kernel-lengths", ",".join(map(str, args.kernel_lengths)), "--kernel-cases", ",".join(args.kernel_cases)]
    argv += ["--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    argv += ["--kernel-backends", ",".join(args.kernel_backends)] if args.kernel_backends else []
    argv += ["--time-limit", str(args.time_limit)] if args.time_limit else []
    argv += ["--json", args.json] if args.json else []
    return kernelbench.main(argv)


def _bench(args) -> int:
    from hf_seqpar.tools.bench import BenchSpec, format_table, plot_rows, run_bench
    from hf_seqpar.tools.presets import load_config

    if args.kernels:
        return _bench_kernels(args)
    if args.scaling:
        return _bench_scaling(args)
    if args.rows:
        return _bench_rows(args)

    try:
        load_config(args.model, num_hidden_layers=args.layers)  # a bad --model fails here, not in every rank
    except ValueError as e:
        args.parser.error(str(e))

    options = {"ulysses_size": args.ulysses_size} if args.ulysses_size else {}
    spec = BenchSpec(
        model=args.model,
        layers=args.layers,
        strategies=args.strategies,
        worlds=args.world,
        seq_lens=args.seq_lens,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        dtype=args.dtype,
        baselines=not args.no_baselines,
        peak_tflops=args.peak_tflops,
        options=options,
    )
    rows = run_bench(spec)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        import matplotlib.pyplot as plt

        plt.close(plot_rows(rows, args.plot))
    return 0


def _plan(args) -> int:
    from hf_seqpar.tools.maxseq import SEARCHED_SHARDINGS
    from hf_seqpar.tools.plan import (
        Cluster,
        GiB,
        Setup,
        assumptions,
        attention_balance,
        candidates,
        evaluate,
        lora_params,
        max_seq_len,
        recommend,
    )
    from hf_seqpar.tools.presets import load_config
    from hf_seqpar.tools.theory import ModelShape

    if args.reserve >= args.gpu_mem:
        args.parser.error(
            f"--reserve {args.reserve:g} GiB leaves nothing of --gpu-mem {args.gpu_mem:g} GiB; lower --reserve"
        )
    post_flags = [
        f"--{name.replace('_', '-')}"
        for name in ("ref_model", "ref_bytes", "num_generations", "prompt_len", "steps_per_generation", "generation")
        if getattr(args, name) is not None
    ]
    if args.inference:
        if args.post_training or post_flags:
            args.parser.error(
                f"{' '.join(([f'--post-training {args.post_training}'] if args.post_training else []) + post_flags)}"
                " with --inference: those plan TRL's DPO/GRPO training; drop --inference (or them)"
            )
        from hf_seqpar.tools.plan_infer import plan_inference

        return plan_inference(args)
    post = _post_training(args, post_flags)
    try:
        shape = ModelShape.from_config(load_config(args.model))
    except ValueError as e:
        args.parser.error(str(e))
    if args.offload and args.no_checkpointing:
        args.parser.error(
            "--offload offloads the checkpointed layer inputs: it needs checkpointing (drop --no-checkpointing)"
        )
    if args.attn_mfu > 1:
        args.parser.error(f"--attn-mfu is a share of the peak, at most 1, got {args.attn_mfu:g}")
    cluster = Cluster(
        args.gpus,
        args.gpu_mem,
        args.gpus_per_node,
        args.intra_bw,
        args.inter_bw,
        args.reserve,
        host_mem_gib=args.host_mem,
        peak_tflops=args.tflops,
        attention_mfu=args.attn_mfu,
        max_step_s=args.max_step_s,
    )
    trainable = lora_params(shape, args.lora_rank) if args.lora_rank else args.trainable_params
    if trainable is not None and not 0 < trainable <= shape.params:
        args.parser.error(
            f"--trainable-params must be in (0, {shape.params:.4g}] (the model's parameters), got {trainable:g}"
        )
    setup = Setup(
        sharding=args.sharding or "fsdp",
        checkpointing=not args.no_checkpointing,
        chunked_loss=not args.no_chunked_loss,
        batch=args.batch,
        loss_chunk_size=args.loss_chunk,
        offload_checkpoints=args.offload,
        mlp_tiles=args.mlp_tiles,
        optimizer=args.optimizer,
        optim_bytes=args.optim_bytes,
        trainable_params=None if trainable is None else int(trainable),
        post_training=post,
    )
    cands = candidates(shape, cluster)
    if post is not None:
        from hf_seqpar.tools.plan_post import post_strategies_ok

        cands = [c for c in cands if post_strategies_ok(c.cls)]  # Megatron-SP: refused by the mixin
    rows = [evaluate(shape, args.seq_len, c, cluster, setup) for c in cands]
    for c, r in zip(cands, rows):
        r["attention_balance"] = attention_balance(c, args.seq_len, args.rows)
    if args.max_seq:
        for c, r in zip(cands, rows):
            r["max_seq_len"] = max_seq_len(shape, c, cluster, setup)
    print(
        f"{args.model}: {shape.params / 1e9:.2f}B parameters, {shape.layers} layers, {shape.heads} heads "
        f"({shape.kv_heads} kv), seq {args.seq_len:,} on {args.gpus} x {args.gpu_mem:g} GiB"
    )
    print(
        f"budget per GPU: {args.gpu_mem:g} GiB - {args.reserve:g} GiB reserve (CUDA context, NCCL, workspaces; "
        f"--reserve) = {args.gpu_mem - args.reserve:g} GiB"
    )
    for line in assumptions(shape, cluster, setup):
        print("assumes: " + line)
    head = (
        f"{'candidate':<16}{'dp':>4}{'states GiB':>12}{'act GiB':>10}{'total GiB':>11}{'fits':>6}"
        f"{'SP GB/step':>12}{'SP ms':>9}"
    )
    if post is not None:
        print("states include the reference weights (ref GiB); act: the peak phase's transient beyond them")
        head += f"{'ref GiB':>9}  {'peak phase':<20}"
    print(head + f"  work max/mean ({args.rows} row; zigzag)" + ("  max seq" if args.max_seq else ""))
    for r in rows:
        states = r["states_bytes"] + r["gathered_bytes"]
        bal = r["attention_balance"]
        work = (
            f"{bal['work_max_over_mean']:.2f} {bal['layout']}, pad {bal['pad']} "
            f"({bal['zigzag_work_max_over_mean']:.2f})"
            if bal["layout"]
            else "1.00 (all tokens)"
        )
        line = (
            f"{r['candidate']:<16}{r['dp']:>4}{states / GiB:>12.1f}{r['activation_bytes'] / GiB:>10.1f}"
            f"{r['total_bytes'] / GiB:>11.1f}{'yes' if r['fits'] else 'no':>6}{r['comm_bytes'] / 1e9:>12.2f}"
            f"{r['comm_seconds'] * 1e3:>9.1f}"
            + (f"{r['ref_bytes'] / GiB:>9.1f}  {r['peak_phase']:<20}" if post is not None else "")
            + f"  {work}"
        )
        print(line + (f"  {r['max_seq_len']:,}" if args.max_seq else ""))
    best, why = recommend(rows)
    print(("Recommended: " if best else "") + why)
    if post is not None:
        shown = best or min(rows, key=lambda r: r["total_bytes"])
        print(
            f"phases of {shown['candidate']} (GiB per GPU): "
            + ", ".join(f"{k} {v / GiB:.1f}" for k, v in shown["post_phases"].items())
        )
    result = {"candidates": rows, "recommended": best, "reason": why}
    if args.max_seq:
        longest = max(rows, key=lambda r: r["max_seq_len"])
        print(
            f"Longest sequence that fits: {longest['max_seq_len']:,} tokens with {longest['candidate']} "
            f"({setup.features.label}, {setup.sharding})"
            if longest["max_seq_len"]
            else f"Longest sequence that fits with {setup.features.label}, {setup.sharding}: none"
        )
        result["longest"] = _print_longest(shape, cluster, setup, None if args.sharding else SEARCHED_SHARDINGS)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if best or (args.max_seq and result.get("longest")) else 1


def _post_training(args, post_flags):
    """The :class:`~hf_seqpar.tools.plan_post.PostTraining` of ``--post-training`` (None without it), or a
    parser error naming the fix."""
    from hf_seqpar.tools.plan_post import PostTraining

    if args.post_training is None:
        if post_flags:
            args.parser.error(f"{' '.join(post_flags)} need --post-training dpo or grpo")
        return None
    grpo_only = [f for f in post_flags if f not in ("--ref-model", "--ref-bytes")]
    if args.post_training == "dpo" and grpo_only:
        args.parser.error(f"{' '.join(grpo_only)}: GRPO options; --post-training dpo takes --ref-model and --ref-bytes")
    unmodelled = [
        flag
        for flag, on in (
            ("--offload", args.offload),
            ("--no-chunked-loss", args.no_chunked_loss),
            ("--lora-rank", args.lora_rank is not None),
            ("--trainable-params", args.trainable_params is not None),
            ("--max-seq", args.max_seq),
        )
        if on
    ]
    if unmodelled:
        args.parser.error(
            f"{' '.join(unmodelled)} with --post-training: not modelled for TRL's trainers (TRL's fused LM head "
            "replaces hf_seqpar's loss; hf_seqpar's DPO support refuses PEFT models; the longest-sequence search "
            "varies features TRL's path does not take); drop them"
        )
    post = PostTraining(
        args.post_training,
        ref_model=args.ref_model or "same",
        ref_elem=args.ref_bytes or 2,
        num_generations=args.num_generations or 8,
        prompt_len=args.prompt_len,
        steps_per_generation=args.steps_per_generation or 1,
        generation=args.generation or "hf",
    )
    try:
        post.check(args.seq_len)
    except ValueError as e:
        args.parser.error(str(e))
    return post


#: What each searched sharding asks of the accelerate config (printed with the longest sequence).
#: The accelerate configs the recipes ship, by (states in host memory, several nodes): file, ranks, nodes.
_ACCELERATE_CONFIGS = {
    (False, False): ("gpu-8", 8, 1),
    (False, True): ("gpu-multinode", 32, 4),
    (True, False): ("gpu-8-offload", 8, 1),
    (True, True): ("gpu-multinode-offload", 32, 4),
}


def _states_launch(sharding: str, gpus: int, gpus_per_node: int) -> str | None:
    """Where the model states live under ``sharding`` and the accelerate config that puts them there
    (with the flags that change its rank and node counts when ``gpus`` differs from the file's)."""
    if sharding not in ("fsdp", "fsdp_offload"):
        return None
    offload = sharding == "fsdp_offload"
    if offload and gpus == 1:
        config, ranks, nodes = "gpu-1-offload", 1, 1
    else:
        config, ranks, nodes = _ACCELERATE_CONFIGS[(offload, gpus > gpus_per_node)]
    need_nodes = -(-gpus // gpus_per_node)
    flags = (f" --num_processes {gpus}" if gpus != ranks else "") + (
        f" --num_machines {need_nodes}" if need_nodes != nodes else ""
    )
    where = "in host memory (FSDP2 with fsdp_offload_params: true" if offload else "sharded over the GPUs (FSDP2"
    cpu_step = "; the optimizer step runs on the CPU" if offload else ""
    return f"states {where}: recipes/accelerate/{config}.yaml{flags}{cpu_step})"


def _print_longest(shape, cluster, setup, shardings=None) -> dict | None:
    from hf_seqpar.tools.maxseq import longest
    from hf_seqpar.tools.plan import GiB

    found = longest(shape, cluster, setup, shardings=shardings)
    searched = "the memory features searched" + (" and state shardings" if shardings else "")
    if found is None:
        print(f"Longest sequence with {searched}: nothing fits, with any of them (see the reason above)")
        return None
    r, lim = found.row, found.limits
    show = lambda v: "unbounded" if v == float("inf") else f"{int(v):,}"  # noqa: E731
    print(
        f"Longest sequence with {searched}: {found.seq_len:,} tokens with {found.candidate} "
        f"({found.setup.features.label}, {found.setup.sharding}), bound by {found.binding} (predicted)"
    )
    limit = "no limit, --max-step-s" if cluster.max_step_s is None else f"limit {cluster.max_step_s:g} s"
    print(
        f"  device {r['total_bytes'] / GiB:.1f} of {r['budget_bytes'] / GiB:.1f} GiB per GPU "
        f"({r['states_bytes'] / GiB:.1f} states + {r['gathered_bytes'] / GiB:.1f} gathered by FSDP + "
        f"{r['activation_bytes'] / GiB:.1f} activations at the "
        f"{r['peak_phase']} peak); host {r['host_node_bytes'] / GiB:.1f} of {r['host_budget_bytes'] / GiB:.0f} GiB "
        f"per node; attention {r['attention_seconds']:,.0f} s per step ({limit})"
    )
    print(
        f"  each limit alone: device memory {show(lim['device'])}, host memory {show(lim['host'])}, "
        "attention time " + ("no limit (--max-step-s)" if cluster.max_step_s is None else f"{show(lim['time'])} tokens")
    )
    launch = _states_launch(found.setup.sharding, cluster.gpus, cluster.gpus_per_node)
    if launch:
        print(f"  model states: {found.setup.sharding}: {launch}")
    print("  plugin YAML:\n    " + found.plugin_yaml().strip().replace("\n", "\n    "))
    return {
        "seq_len": found.seq_len,
        "candidate": found.candidate,
        "features": found.setup.features.label,
        "sharding": found.setup.sharding,
        "binding": found.binding,
        "limits": {k: (None if v == float("inf") else v) for k, v in lim.items()},
        "row": r,
        "plugin_yaml": found.plugin_yaml(),
    }


def _selftest_parser(sub) -> None:
    p = sub.add_parser(
        "selftest",
        help="check this installation: CPU strategies vs the unsharded model; --gpu: the CUDA checks",
        description="Without --gpu: 2 gloo ranks on CPU, one training step of every strategy on a "
        "plain and a packed batch against the unsharded model (loss, logits, every "
        "gradient), a pass/fail table; exit 1 on any failure. With --gpu: the CUDA checks "
        "on one GPU, each case in its own process: the gpu-marked tests, a kernel-backend "
        "sweep against float64, the variable-length pieces, and long single-GPU steps at "
        "S and 2S; writes selftest.json and selftest.md (without a GPU it selects nothing "
        "CUDA and exits 0).",
    )
    p.add_argument("--gpu", action="store_true", help="run the GPU checks instead of the CPU check")
    p.add_argument("--out", default=".", help="--gpu: folder for selftest.json / selftest.md (default: .)")
    p.add_argument(
        "--budget", type=float, default=540.0, help="--gpu: seconds after which no new case starts (default 540)"
    )
    p.add_argument("--tests", default=None, help="--gpu: the repository's tests folder (default: beside the package)")
    p.add_argument(
        "--cases",
        type=_names,
        default=None,
        help="comma-separated case names (default: all): strategies on CPU, GPU case names with --gpu",
    )


def _selftest(args) -> int:
    if args.gpu:
        from hf_seqpar.tools.selftest import CASES as valid
    else:
        from hf_seqpar.strategies import STRATEGIES as valid
    unknown = [c for c in args.cases or () if c not in valid]
    if unknown:
        args.parser.error(
            f"--cases {unknown}: unknown {'GPU case' if args.gpu else 'strategy'} name(s); valid: {', '.join(valid)}"
        )
    if not args.gpu:
        from hf_seqpar.tools.cpucheck import run_cpu_selftest

        return run_cpu_selftest(args.cases)
    from hf_seqpar.tools.selftest import run_selftest

    return run_selftest(args.out, args.budget, args.tests, args.cases)


def _launch_parser(sub) -> None:
    from hf_seqpar.launch import add_arguments

    p = sub.add_parser(
        "launch",
        help="run a stock Trainer/SFTTrainer script with sequence parallelism",
        description="Run a training script written for the stock transformers.Trainer or TRL's "
        "SFTTrainer, unchanged, with those classes made sequence-parallel (the same as "
        "`python -m hf_seqpar.launch`). Start it under a launcher: `accelerate launch -m "
        "hf_seqpar.launch --sp-config X train.py ...` or `torchrun --nproc_per_node N "
        "--no-python hf-seqpar launch --sp-config X train.py ...`.",
    )
    add_arguments(p)


def _launch(args) -> int:
    from hf_seqpar.launch import run_script

    run_script(args.script, args.script_args, args.sp_config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-seqpar`` argument parser (``parse_args`` gives ``command`` and the subcommand's options)."""
    from hf_seqpar import __version__  # the package's __init__ imports nothing heavy: --help stays fast

    parser = argparse.ArgumentParser(prog="hf-seqpar", description="hf_seqpar tools: bench, plan, selftest and launch")
    parser.add_argument("--version", action="version", version=f"hf-seqpar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _bench_parser(sub)
    _plan_parser(sub)
    _selftest_parser(sub)
    _launch_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-seqpar`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.parser = parser._subparsers._group_actions[0].choices[args.command]
    return {"bench": _bench, "plan": _plan, "selftest": _selftest, "launch": _launch}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
