"""The model and mixture-of-experts options, shared by `tinymoe train` and `tinymoe estimate` (one home: the
MoE flags are generated from MoEConfig's fields), and the TransformerConfig they describe."""
from __future__ import annotations

from ..models.transformer import DEFAULT_MOE_SIZES
from ..nn.moe_config import MoEConfig
from .arguments import UsageError, add_config_options, add_option, fraction_below_one, non_negative_float, positive_int


def add_model_options(parser) -> None:
    """The "model" and "mixture of experts" argument groups; sets `moe_options` (the MoEConfig field names)."""
    model = parser.add_argument_group("model")
    add_option(model, "--d-model", type=positive_int, default=64, help="width of the token vectors")
    add_option(model, "--layers", type=positive_int, default=2, help="transformer blocks")
    add_option(model, "--heads", type=positive_int, default=4, help="attention heads (must divide --d-model)")
    add_option(model, "--seq-len", type=positive_int, default=64, help="context length in characters")
    add_option(model, "--dtype", choices=("float32", "float64", "float16"), default="float32",
               help="parameter dtype (float16 needs --device cuda)")
    add_option(model, "--dropout", type=fraction_below_one, default=0.0,
               help="dropout after attention and FFN, in [0, 1)")
    moe = parser.add_argument_group("mixture of experts")
    parser.set_defaults(moe_options=add_config_options(moe, MoEConfig, DEFAULT_MOE_SIZES))
    add_option(moe, "--moe-layers", default="all", help="'all' or comma-separated layer indices; others are dense")
    add_option(moe, "--aux-coef", type=non_negative_float, default=0.01, help="weight of the load-balance loss")
    add_option(moe, "--z-coef", type=non_negative_float, default=0.001, help="weight of the router z-loss")
    add_option(moe, "--noisy-coef", type=non_negative_float, default=0.01,
               help="weight of the importance and load losses (router noisy)")


def moe_layers(text: str) -> list:
    if text.strip() == "all":
        return ["all"]
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        layers = None
    if not layers:
        raise UsageError(f"--moe-layers {text!r}: expected 'all' or comma-separated integers like 0,2 (a model "
                         "without MoE layers is not what this command trains)")
    return layers


def model_config(args, vocab_size: int):
    """The TransformerConfig of the model options in `args`; UsageError for options that contradict each other."""
    from ..models import TransformerConfig

    layers = moe_layers(args.moe_layers)
    try:
        return TransformerConfig(
            vocab_size=vocab_size, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
            max_seq_len=args.seq_len, moe={name: getattr(args, name) for name in args.moe_options},
            moe_layers=layers, aux_coef=args.aux_coef, z_coef=args.z_coef, noisy_coef=args.noisy_coef,
            dropout=args.dropout, dtype=args.dtype)
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
