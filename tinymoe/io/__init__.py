"""Files: atomic writes, .safetensors, Mixtral-format weights."""
from .atomic import atomic_write
from .mixtral import load_mixtral, mixtral_state_dict
from .safetensors_io import load_safetensors, save_safetensors

__all__ = ["atomic_write", "load_mixtral", "load_safetensors", "mixtral_state_dict", "save_safetensors"]
