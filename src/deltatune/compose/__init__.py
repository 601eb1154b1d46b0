"""Composition: how several active deltas combine at each module (docs/composition.md)."""
from .arrow import Arrow
from .blocks import POSITIONS, Average, Block, Context, Node, Stack, Sum, additive_names, as_node, leaves, placements, run, without
from .fuse import Fuse
from .route import Route, per_row

__all__ = ["Arrow", "Average", "Block", "Context", "Fuse", "Node", "POSITIONS", "Route", "Stack", "Sum", "additive_names",
           "as_node", "leaves", "per_row", "placements", "run", "without"]
