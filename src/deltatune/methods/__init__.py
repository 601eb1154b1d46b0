"""Methods: one file per family, each a config plus a Piece."""
from .full import Full, FullPiece
from .lora import LoRA, LoRAPiece

__all__ = ["Full", "FullPiece", "LoRA", "LoRAPiece"]
