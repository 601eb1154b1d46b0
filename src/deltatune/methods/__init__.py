"""Methods: one file per family, each a config plus a Piece."""
from .lora import LoRA, LoRAPiece

__all__ = ["LoRA", "LoRAPiece"]
