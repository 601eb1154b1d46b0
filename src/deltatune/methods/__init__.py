"""Methods: one file per family, each a config plus a Piece."""
from .dense import Dense, DensePiece
from .full import Full, FullPiece
from .fusion import Fusion, FusionPiece
from .ia3 import IA3, IA3InputPiece, IA3Piece
from .lora.lora import LoRA, LoRAPiece
from .loha import LoHa, LoHaPiece
from .lokr import LoKr, LoKrPiece
from .sparse.paca import PaCA, PaCAPiece
from .poly import Poly, PolyPiece
from .sorsa import SORSA, SORSAPiece
from .sparse.sparse import Sparse, SparsePiece
from .ternary import Ternary, TernaryPiece
from .ssf import SSF, SSFPiece
from .bitfit import BitFit, BitFitPiece
from .layernorm import LNTuning, LNTuningPiece
from .vera.vera import VeRA, VeRAPiece
from .vera.lora_xs import LoRAXS, LoRAXSPiece
from .vera.randlora import RandLoRA, RandLoRAPiece
from .adalora.adalora import AdaLoRA, AdaLoRAPiece
from .prompts.prompts import PrefixPiece, PrefixTuning, PromptPiece, PromptTuning
from .adapters.adapters import AdaptFormer, Houlsby, ParallelAdapter, Pfeiffer

__all__ = ["Dense", "DensePiece", "Full", "FullPiece", "LoRA", "LoRAPiece", "PaCA", "PaCAPiece", "Sparse", "SparsePiece",
           "Ternary", "TernaryPiece"]
__all__ += ["LoHa", "LoHaPiece", "LoKr", "LoKrPiece", "SORSA", "SORSAPiece"]
__all__ += ["SSF", "SSFPiece", "BitFit", "BitFitPiece", "LNTuning", "LNTuningPiece"]
__all__ += ["VeRA", "VeRAPiece", "LoRAXS", "LoRAXSPiece", "RandLoRA", "RandLoRAPiece"]
__all__ += ["AdaLoRA", "AdaLoRAPiece"]
__all__ += ["IA3", "IA3Piece", "IA3InputPiece"]
__all__ += ["Fusion", "FusionPiece"]
__all__ += ["PrefixPiece", "PrefixTuning", "PromptPiece", "PromptTuning"]
__all__ += ["AdaptFormer", "Houlsby", "ParallelAdapter", "Pfeiffer"]
__all__ += ["Poly", "PolyPiece"]
