"""Greedy decoding against transformers' `generate(do_sample=False)` on the same tiny float64 checkpoints: the
same tokens for a batch of equal-length prompts, with and without an eos that stops one sequence early."""
import numpy as np
import pytest

from test_hf_model_transformers import transformers_model
from tinymoe.models.pretrained import from_pretrained

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

PROMPT = np.array([[1, 5, 0, 7, 3], [4, 4, 2, 10, 9]])


def transformers_greedy(model, prompt, max_new_tokens, eos_token_id, pad_token_id):
    model.generation_config.eos_token_id = eos_token_id  # None: never stop (not the config's default eos)
    model.generation_config.pad_token_id = pad_token_id
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, num_beams=1, top_k=None, top_p=None,
                             temperature=None)
    return out.numpy()


@pytest.mark.parametrize("case", ["llama", "qwen3", "mixtral_sliding", "qwen3_moe", "olmoe", "qwen2_moe", "gpt_oss",
                                  "deepseek_v3", "deepseek_v3_no_q_lora"])
def test_greedy_generation_matches_transformers(case, tmp_path):
    reference = transformers_model(case, seed=1)
    reference.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, dtype="float64")
    no_stop = ours.generate(PROMPT, max_new_tokens=10)
    assert no_stop.shape == (2, 15)
    np.testing.assert_array_equal(transformers_greedy(reference, PROMPT, 10, None, 0), no_stop)
    eos = int(no_stop[0, 7])  # sequence 0 produces it at its third new token (or earlier)
    with_eos = ours.generate(PROMPT, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    assert with_eos.shape[1] < 15 or (with_eos[1, 5:] != eos).all()  # stopped early unless sequence 1 never ends
    np.testing.assert_array_equal(transformers_greedy(reference, PROMPT, 10, eos, 0), with_eos)
