"""Merging many deltas in ΔW space, module by module: methods, pipeline, checkpoints, compression, extraction."""
# merge methods (registered on import), Fisher estimation, greedy soups
from . import methods_basic, methods_sparsify  # noqa: F401  (registers every method)
from .fisher import estimate_fisher, load_fisher, save_fisher
from .methods_basic import mwa_weights
from .methods_sparsify import tall_masks
from .registry import (Fraction, MergeMethod, NonNegative, NonNegativeInt, PerInput, Positive, PositiveInt, Range, Unit,
                       generator, get_method, list_methods, merge_method)
from .soups import Soup, greedy_soup
# the pipeline: deltas module by module, full checkpoints key by key, YAML recipes
from .combine import merge_deltas
from .full_models import apply_delta, merge_models, merge_models_to_delta
from .recipe import load_recipe, run_recipe
