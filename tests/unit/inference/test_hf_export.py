"""Hugging Face export against the real ``transformers``: exported logits equal GPTModel's, prefill + cached
decoding equals the full forward, greedy ``generate()`` with the LongShortCache equals greedy decoding by
repeated full forwards of our model (prompts crossing window/chunk boundaries, left-padded batches), and the
cache holds ``w + r·floor(t/l) + (t mod l)`` entries per Long-Short layer."""
from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(tempfile.gettempdir(), "megatron_ls_hf_modules"))

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from megatron_ls.config import TransformerConfig  # noqa: E402
from megatron_ls.inference.hf_export import export_hf  # noqa: E402
from megatron_ls.model import GPTModel  # noqa: E402

W, L, VOCAB, EOD = 16, 8, 384, 256
FP32 = dict(rtol=1e-5, atol=1e-4)  # logits here reach ~13; fp32 rounding alone moves them by up to ~3e-5
CONFIGS = {
    "both": {},
    "window_only": dict(projection_rank=0),
    "projection_only": dict(window_size=0),
    "no_dual_ln": dict(dual_ln=False),
    "masformer": dict(full_attention_layers=(1,)),
    "no_positions": dict(position_embedding_type="none"),
    "rope_head_ln": dict(position_embedding_type="rope", dual_ln_scope="head", full_attention_layers=(0,)),
    "llama_style": dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                        untie_embeddings_and_output_weights=True),
}


def build_ours(seed: int = 11, **overrides) -> GPTModel:
    """A tiny fp32 GPTModel (hidden 32, 2 layers) whose greedy choices vary with the context."""
    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=128, vocab_size=VOCAB,
                  hidden_dropout=0.0, attention_dropout=0.0, window_size=W, segment_length=L, projection_rank=2,
                  attention_backend="torch", seed=seed, init_method_std=0.5)
    fields.update(overrides)
    model = GPTModel(TransformerConfig(**fields)).eval()
    with torch.no_grad():  # wide residual branches: outputs depend on attention, greedy far from ties
        for layer in model.layers:
            layer.self_attention.dense.weight.mul_(5.0)
            layer.mlp.dense_4h_to_h.weight.mul_(5.0)
    return model


_EXPORTS: dict = {}


def export(tmp_root: str, name: str) -> tuple[GPTModel, str]:
    """(our model, exported directory) for config ``name``, built once per session."""
    if name not in _EXPORTS:
        ours = build_ours(**CONFIGS[name])
        directory = os.path.join(tmp_root, name)
        export_hf(directory, ours.config, ours.state_dict(), tokenizer={"tokenizer_type": "ByteTokenizer"})
        _EXPORTS[name] = (ours, directory)
    return _EXPORTS[name]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf_export"))


def load(directory: str, **config_overrides):
    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, **config_overrides).eval()


def expected_entries(config: TransformerConfig, t: int) -> list:
    """The cache formula per layer after ``t`` tokens."""
    out = []
    for i in range(config.num_layers):
        if config.layer_uses_full_attention(i):
            out.append({"kind": "full", "full": t})
        else:
            r = config.projection_rank
            out.append({"kind": "long_short", "ring": config.window_size, "compressed": r * (t // L),
                        "partial": t % L if r else 0})
    return out


def greedy_reference(ours: GPTModel, prompt: torch.Tensor, steps: int) -> tuple[list, float]:
    """Greedy tokens by repeated full forwards (stopping after EOD) and the smallest top-2 logit margin seen."""
    seq, tokens, margin = prompt[None], [], float("inf")
    with torch.no_grad():
        for _ in range(steps):
            top = ours(seq)[0, -1].topk(2)
            margin = min(margin, float(top.values[0] - top.values[1]))
            tokens.append(int(top.indices[0]))
            if tokens[-1] == EOD:
                break
            seq = torch.cat([seq, top.indices[:1][None]], dim=1)
    return tokens, margin


def test_transformers_is_the_pinned_one():
    assert transformers.__version__.split(".")[0] == "5", transformers.__version__


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exported_logits_equal_ours(tmp_root, name):
    ours, directory = export(tmp_root, name)
    tokens = torch.randint(0, VOCAB, (2, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = ours(tokens)
        for block in (128, 8):  # one query block, and many (ring skipped past the first w-1 queries)
            hf = load(directory, attention_block_size=block)
            assert hf.dtype == torch.float32
            torch.testing.assert_close(hf(tokens).logits, reference, **FP32)
        # in float64 the two implementations agree to rounding (fp32 alone moves logits of ~13 by ~3e-5)
        hf64 = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float64,
                                                    attention_block_size=8)
        torch.testing.assert_close(hf64(tokens).logits, ours.double()(tokens), rtol=1e-10, atol=1e-10)
        ours.float()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_cached_steps_equal_the_full_forward(tmp_root, name):
    ours, directory = export(tmp_root, name)
    hf = load(directory)
    cache_class = sys.modules[type(hf).__module__].LongShortCache  # the remote code's own class
    tokens = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = ours(tokens)
        for prompt in (1, L - 1, L, W + 1):
            cache = cache_class(hf.config)
            pieces = [hf(tokens[:, :prompt], past_key_values=cache).logits]
            for t in range(prompt, tokens.shape[1]):
                pieces.append(hf(tokens[:, t:t + 1], past_key_values=cache).logits)
                if t in (prompt, W + L + 3):
                    assert cache.entries() == expected_entries(ours.config, t + 1)
            torch.testing.assert_close(torch.cat(pieces, dim=1), reference, **FP32)
            assert cache.entries() == expected_entries(ours.config, tokens.shape[1])
            assert cache.get_seq_length() == tokens.shape[1]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("prompt_len", [1, L - 1, L, W + 1])
def test_greedy_generate_equals_repeated_full_forwards(tmp_root, name, prompt_len):
    ours, directory = export(tmp_root, name)
    hf = load(directory)
    prompt = torch.randint(0, EOD, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len))
    steps = 2 * W + 3
    expected, margin = greedy_reference(ours, prompt, steps)
    assert margin > 1e-3, "the reference greedy path has a near tie; pick another seed"
    out = hf.generate(prompt[None], attention_mask=torch.ones(1, prompt_len, dtype=torch.long),
                      max_new_tokens=steps, do_sample=False, return_dict_in_generate=True)
    assert out.sequences[0, prompt_len:].tolist() == expected
    cache = out.past_key_values
    assert type(cache).__name__ == "LongShortCache"
    assert cache.entries() == expected_entries(ours.config, out.sequences.shape[1] - 1)


@pytest.mark.parametrize("name", ["both", "rope_head_ln"])
def test_left_padded_batch_generates_each_row_as_alone(tmp_root, name):
    ours, directory = export(tmp_root, name)
    hf = load(directory)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, EOD, (n,), generator=gen) for n in (3, W + L + 5)]
    width = max(len(p) for p in prompts)
    ids = torch.full((2, width), EOD, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    steps = W + 2 * L
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False)
    for row, p in enumerate(prompts):
        expected, margin = greedy_reference(ours, p, steps)
        assert margin > 1e-3
        got = out[row, width:].tolist()
        assert got[:len(expected)] == expected
        assert all(t == EOD for t in got[len(expected):])  # rows that stopped are padded with EOD


def test_padding_anywhere_removes_the_token(tmp_root):
    ours, directory = export(tmp_root, "masformer")
    hf = load(directory, attention_block_size=8)
    tokens = torch.randint(0, VOCAB, (2, 50), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[0, 40:] = 0  # right padding
    mask[1, :7] = 0  # left padding, and a hole
    mask[1, 20:23] = 0
    with torch.no_grad():
        logits = hf(tokens, attention_mask=mask).logits
        for row in range(2):
            keep = mask[row].bool()
            torch.testing.assert_close(logits[row, keep], ours(tokens[row:row + 1, keep])[0], **FP32)


def test_beam_search_and_sampling_run_on_the_cache(tmp_root):
    _, directory = export(tmp_root, "masformer")
    hf = load(directory)
    ids = torch.randint(0, EOD, (2, 12), generator=torch.Generator().manual_seed(4))
    beams = hf.generate(ids, max_new_tokens=W, num_beams=3, do_sample=False)
    assert beams.shape == (2, 12 + W)
    torch.manual_seed(0)
    a = hf.generate(ids, max_new_tokens=W, do_sample=True, top_k=5)
    torch.manual_seed(0)
    assert torch.equal(a, hf.generate(ids, max_new_tokens=W, do_sample=True, top_k=5))


def test_loss_and_errors(tmp_root):
    ours, directory = export(tmp_root, "both")
    hf = load(directory)
    tokens = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        loss = hf(tokens, labels=tokens).loss
        expected = ours(tokens[:, :-1], labels=tokens[:, 1:]).mean()
    torch.testing.assert_close(loss, expected, **FP32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        hf(torch.zeros(1, 129, dtype=torch.long))
    from transformers import DynamicCache

    filled = DynamicCache()
    filled.update(torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8), 0)
    with pytest.raises(TypeError, match="LongShortCache"):
        hf(tokens[:, :2], past_key_values=filled)
    with pytest.raises(ValueError, match="attention_mask must be 2D"):
        hf(tokens, attention_mask=torch.ones(1, 1, 40, 40))


def test_save_pretrained_round_trip(tmp_root, tmp_path):
    ours, directory = export(tmp_root, "masformer")
    hf = load(directory)
    hf.save_pretrained(tmp_path / "again")
    again = load(str(tmp_path / "again"))
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()  # still tied
    tokens = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, ours(tokens), **FP32)
