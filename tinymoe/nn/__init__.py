"""tinymoe.nn: modules built from tinymoe.functional ops."""
from .expert_parallel import ExpertParallelMoE, expert_parallel
from .experts import Experts, SwiGLU
from .layers import Dropout, Embedding, LayerNorm, Linear, RMSNorm
from .module import Module, ModuleList, Parameter, Sequential
from .moe import MoE, MoEStats
from .moe_config import MoEConfig
from .router import Router

__all__ = ["Dropout", "Embedding", "ExpertParallelMoE", "Experts", "LayerNorm", "Linear", "MoE", "MoEConfig", "MoEStats", "Module",
           "ModuleList", "Parameter", "RMSNorm", "Router", "Sequential", "SwiGLU", "expert_parallel"]
