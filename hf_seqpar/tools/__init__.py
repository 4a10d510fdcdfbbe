"""Command-line tools and what they compute: ``hf-seqpar`` (cli), benchmarks, the planner and its
closed-form cost model, model presets and the GPU self-check."""
