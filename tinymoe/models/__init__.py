"""Models built from tinymoe.nn: tinymoe's own MoETransformer, and transformers' architectures loaded from
their checkpoints (config.json + safetensors) with NumPy alone (`from_pretrained`)."""
from .hf_checkpoint import CheckpointError
from .hf_config import SUPPORTED_MODEL_TYPES, HFModelSpec, parse_hf_config
from .hf_model import HFCausalLM
from .kv_cache import KVCache
from .pretrained import from_pretrained
from .transformer import MoETransformer, TransformerConfig
from .upcycle import upcycle

__all__ = ["CheckpointError", "HFCausalLM", "HFModelSpec", "KVCache", "MoETransformer", "SUPPORTED_MODEL_TYPES",
           "TransformerConfig", "from_pretrained", "parse_hf_config", "upcycle"]
