"""Merging many deltas in ΔW space, module by module: methods, pipeline, checkpoints, compression, extraction."""
# merge methods (registered on import), Fisher estimation, greedy soups
from . import methods_basic, methods_sparsify  # noqa: F401  (registers every method)
from .fisher import estimate_fisher, load_fisher, save_fisher
from .methods_basic import mwa_weights
from .methods_sparsify import tall_masks
from .registry import MergeMethod, PerInput, generator, get_method, list_methods, merge_method
from .soups import Soup, greedy_soup
