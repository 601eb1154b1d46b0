"""Methods: one file per family, each a config plus a Piece."""
from .dense import Dense, DensePiece
from .full import Full, FullPiece
from .lora import LoRA, LoRAPiece
from .paca import PaCA, PaCAPiece
from .sparse import Sparse, SparsePiece
from .ternary import Ternary, TernaryPiece

__all__ = ["Dense", "DensePiece", "Full", "FullPiece", "LoRA", "LoRAPiece", "PaCA", "PaCAPiece", "Sparse", "SparsePiece",
           "Ternary", "TernaryPiece"]
