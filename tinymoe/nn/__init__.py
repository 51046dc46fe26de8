"""tinymoe.nn: modules built from tinymoe.functional ops."""
from .layers import Dropout, Embedding, LayerNorm, Linear, RMSNorm
from .module import Module, ModuleList, Parameter, Sequential

__all__ = ["Dropout", "Embedding", "LayerNorm", "Linear", "Module", "ModuleList", "Parameter", "RMSNorm", "Sequential"]
from .experts import Experts, SwiGLU
from .moe import MoE, MoEStats
from .router import Router

__all__ += ["Experts", "MoE", "MoEStats", "Router", "SwiGLU"]
