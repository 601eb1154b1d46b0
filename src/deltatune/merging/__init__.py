"""Merging many deltas in ΔW space, module by module: methods, pipeline, checkpoints, compression, extraction."""
