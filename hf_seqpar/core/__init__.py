"""The core of hf_seqpar: the mesh and the state on the model, batch sharding, layouts, segments
and masks, collectives, the exact loss, the attention hook and the memory features.

Nothing in ``core`` imports a strategy, the tensor-parallel machinery, an integration or a tool:
they all build on it.
"""
