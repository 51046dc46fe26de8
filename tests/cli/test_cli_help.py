"""`tinymoe <command> --help`: every option has a one-line description and shows its default once; the MoE
options of `train` are generated from MoEConfig's fields (flag names, help, defaults, checks)."""
import dataclasses
import re

import pytest

from tinymoe.cli.main import build_parser, main
from tinymoe.models.transformer import DEFAULT_MOE_SIZES
from tinymoe.nn import MoEConfig

COMMANDS = ["train", "sample", "generate", "estimate", "doctor", "gradcheck", "info"]


def help_text(capsys, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def option_entries(text: str) -> dict:
    """{first flag: help text} of every option listed in an argparse help page (entries span lines)."""
    entries, current = {}, None
    body = text.split("\n\n", 1)[1]  # after the usage block
    for line in body.splitlines():
        if re.match(r"^  -", line):
            invocation, _, rest = line.strip().partition("  ")
            current = invocation.split(",")[0].split()[0]
            entries[current] = rest.strip()
        elif current and line.startswith("   ") and line.strip():
            entries[current] = (entries[current] + " " + line.strip()).strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_shows_its_default_at_most_once(capsys, monkeypatch, command):
    entries = option_entries(help_text(capsys, monkeypatch, command))
    assert "-h" in entries
    for flag, text in entries.items():
        assert text, f"{command} {flag} has no help"
        assert text.count("default") <= 1, f"{command} {flag}: {text}"
        if flag != "-h":
            assert text.count("(default: ") == 1, f"{command} {flag} does not show its default: {text}"


def test_train_help_lists_every_moe_option_with_its_help_and_default(capsys, monkeypatch):
    entries = option_entries(help_text(capsys, monkeypatch, "train"))
    flagged = [field for field in dataclasses.fields(MoEConfig) if field.metadata.get("flag")]
    assert {field.name for field in flagged} >= {"n_experts", "top_k", "router", "normalize_top_k", "capacity_factor",
                                                 "n_shared_experts", "activation", "jitter", "bias_update_rate"}
    for field in flagged:
        text = entries[f"--{field.metadata['flag']}"]
        assert text.startswith(field.metadata["help"])
        default = DEFAULT_MOE_SIZES.get(field.name, field.default)
        if isinstance(default, bool):
            shown = "on" if default else "off"
        else:
            shown = field.metadata["none_means"] if default is None else str(default)
        assert text.endswith(f"(default: {shown})"), text
    for flag in ("--experts", "--top-k", "--router", "--capacity-factor", "--shared-experts", "--activation",
                 "--jitter", "--bias-update-rate", "--normalize-top-k", "--d-ff"):  # the flag names of 0.1
        assert flag in entries


def test_train_defaults_build_the_default_model_config():
    args = build_parser().parse_args(["train"])
    options = {name: getattr(args, name) for name in args.moe_options}
    defaults = MoEConfig(d_model=64, **DEFAULT_MOE_SIZES)
    assert MoEConfig(d_model=64, **options) == defaults
    assert (args.n_experts, args.top_k, args.router, args.capacity_factor) == (4, 2, "softmax", None)


@pytest.mark.parametrize("args, flag, fragment", [
    (["--capacity-factor", "-1"], "--capacity-factor", "capacity_factor"),
    (["--capacity-factor", "nan"], "--capacity-factor", "finite"),
    (["--jitter", "1.5"], "--jitter", "jitter"),
    (["--shared-experts", "-1"], "--shared-experts", "n_shared_experts"),
    (["--experts", "0"], "--experts", "n_experts"),
    (["--top-k", "two"], "--top-k", "two"),
    (["--router", "top2"], "--router", "top2"),
])
def test_bad_moe_flags_are_argument_errors_naming_the_flag(capsys, args, flag, fragment):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", *args])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"argument {flag}" in error and fragment in error, error
