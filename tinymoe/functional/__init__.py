"""tinymoe.functional: ops on Tensors, each a Function with its hand-written backward beside its forward."""
from .activations import exp, gelu, log, relu, sigmoid, silu, softplus, tanh
from .attention import scaled_dot_product_attention
from .dispatch import combine_rows, gather_rows, routing_plan
from .dropout import dropout
from .experts import mlp_experts, swiglu_experts
from .indexing import concatenate, embedding, one_hot, stack, topk, where
from .linear import linear, matmul
from .losses import cross_entropy, mse_loss
from .norms import layer_norm, rms_norm
from .softmax import log_softmax, logsumexp, softmax

__all__ = [
    "combine_rows", "gather_rows", "routing_plan", "mlp_experts", "swiglu_experts",
    "exp", "gelu", "log", "relu", "sigmoid", "silu", "softplus", "tanh",
    "scaled_dot_product_attention", "dropout",
    "concatenate", "embedding", "one_hot", "stack", "topk", "where",
    "linear", "matmul", "cross_entropy", "mse_loss", "layer_norm", "rms_norm",
    "log_softmax", "logsumexp", "softmax",
]
