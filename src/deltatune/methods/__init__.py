"""Methods: a file per method, or a folder per family; each holds a registered config and its Piece classes.

Every module in this folder is imported here, so a method is added by adding its file: its config registers
itself (`@register(kind)`), `deltatune` exports every registered config by its class name (`dt.LoRA`), and this
package exports those configs and every Piece class the methods define.
"""
import importlib
import pkgutil

from ..core.config import registered
from ..core.piece import Piece

for _info in sorted(pkgutil.walk_packages(__path__, __name__ + "."), key=lambda i: i.name):
    importlib.import_module(_info.name)


def _pieces() -> dict[str, type[Piece]]:
    out: dict[str, type[Piece]] = {}
    todo = list(Piece.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith(__name__ + "."):
            out[cls.__name__] = cls
    return out


CONFIGS = {cls.__name__: cls for cls in registered().values()}
globals().update(CONFIGS)
globals().update(_pieces())
__all__ = sorted([*CONFIGS, *_pieces()])
