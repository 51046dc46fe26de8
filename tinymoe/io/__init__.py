"""Files: atomic writes, .safetensors (NumPy only, single files and sharded checkpoints), Mixtral-format weights."""
from .atomic import atomic_write
from .mixtral import load_mixtral, mixtral_state_dict
from .safetensors_io import (SafetensorsError, SafetensorsFile, SafetensorsIndex, load_safetensors,
                             load_safetensors_index, save_safetensors, save_safetensors_sharded)

__all__ = ["SafetensorsError", "SafetensorsFile", "SafetensorsIndex", "atomic_write", "load_mixtral",
           "load_safetensors", "load_safetensors_index", "mixtral_state_dict", "save_safetensors",
           "save_safetensors_sharded"]
