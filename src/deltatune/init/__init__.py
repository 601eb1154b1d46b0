"""Initialisation from data: which entries a sparse delta trains (SHiRA gradient masks, LT-SFT selection) and
LoRA factors from activations or gradients (EVA, CorDA, LoRA-GA), or from the quantisation error (LoftQ)."""
from .corda import corda
from .eva import eva
from .lora_ga import lora_ga
from .loftq import loftq
from .sparse_masks import attach_sparse, gradient_mask, select_entries

__all__ = ["attach_sparse", "corda", "eva", "gradient_mask", "loftq", "lora_ga", "select_entries"]
