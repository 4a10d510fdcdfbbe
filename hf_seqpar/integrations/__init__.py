"""How hf_seqpar plugs into other libraries' training loops: Accelerate (the plugin and
``prepare_sequence_parallel``), accelerate's ``ParallelismConfig``, and the HF/TRL Trainer."""
