"""`.safetensors` files with NumPy alone: the names callers import (the code lives in safetensors_format,
safetensors_reader and safetensors_writer). The `safetensors` package is not needed."""
from .safetensors_format import SafetensorsError, bfloat16_to_float32, float32_to_bfloat16
from .safetensors_reader import SafetensorsFile, SafetensorsIndex, load_safetensors, load_safetensors_index
from .safetensors_writer import save_safetensors, save_safetensors_sharded

__all__ = ["SafetensorsError", "SafetensorsFile", "SafetensorsIndex", "bfloat16_to_float32", "float32_to_bfloat16",
           "load_safetensors", "load_safetensors_index", "save_safetensors", "save_safetensors_sharded"]
