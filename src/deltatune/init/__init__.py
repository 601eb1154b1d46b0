"""Initialisation from data: which entries a sparse delta trains (SHiRA gradient masks, LT-SFT selection)."""
from .sparse_masks import attach_sparse, gradient_mask, select_entries

__all__ = ["attach_sparse", "gradient_mask", "select_entries"]
