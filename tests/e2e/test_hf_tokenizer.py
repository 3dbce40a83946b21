"""--tokenizer-type HuggingFaceTokenizer end to end: a byte-level BPE trained here with the ``tokenizers`` library
(offline) and saved as a Hugging Face tokenizer directory; the corpus preprocessed with it, GPT-LS trained on it,
the checkpoint exported to Hugging Face with that tokenizer, which encodes exactly as ours."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import iteration_losses, run_cli

pytestmark = pytest.mark.e2e
EOD = "<|endoftext|>"


@pytest.fixture(scope="module")
def hf_tokenizer(corpus_prefix, tmp_path_factory) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = Path(corpus_prefix).parent / "python_docs.jsonl"
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()[:200]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=[EOD],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = tmp_path_factory.mktemp("hf_tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOD).save_pretrained(str(out))
    return str(out)


def test_preprocess_train_and_export_with_a_hugging_face_tokenizer(corpus_prefix, hf_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from megatron_ls.data.tokenizers import build_tokenizer

    corpus = str(Path(corpus_prefix).parent / "python_docs.jsonl")
    tok_flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_tokenizer]
    run_cli([sys.executable, "tools/preprocess_data.py", "--input", corpus, "--output-prefix",
             str(tmp_path / "hf"), "--append-eod", "--workers", "2", *tok_flags])
    ours = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=hf_tokenizer)
    assert ours.vocab_size == 400 and ours.eod == 0 and ours.padded_vocab_size == 512
    from megatron_ls.data.indexed_dataset import IndexedDataset

    first_text = json.loads(Path(corpus).read_text().splitlines()[0])["text"]
    stored = IndexedDataset(str(tmp_path / "hf_text_document"))[0]
    assert list(stored) == ours.tokenize(first_text) + [ours.eod]
    assert ours.detokenize(ours.tokenize(first_text)) == first_text
    ckpt = tmp_path / "ckpt"
    out = run_cli([sys.executable, "pretrain_gpt_ls.py", "--data-path", str(tmp_path / "hf_text_document"),
                   *tok_flags, "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                   "--seq-length", "64", "--window-size", "16", "--segment-length", "8", "--micro-batch-size", "2",
                   "--global-batch-size", "4", "--train-iters", "2", "--log-interval", "1", "--eval-iters", "1",
                   "--save", str(ckpt)]).stdout
    assert sorted(iteration_losses(out)) == [1, 2]
    export = tmp_path / "export"
    run_cli([sys.executable, "tools/convert_checkpoint.py", "--load", str(ckpt), "--to-hf", str(export)])
    assert (export / "tokenizer.json").exists()
    theirs = AutoTokenizer.from_pretrained(str(export), local_files_only=True, trust_remote_code=True)
    assert theirs(first_text).input_ids == ours.tokenize(first_text) and theirs.eos_token_id == ours.eod
    assert json.loads((export / "config.json").read_text())["eos_token_id"] == ours.eod
    missing = run_cli([sys.executable, "tools/preprocess_data.py", "--input", corpus, "--output-prefix",
                       str(tmp_path / "x"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                       os.path.join(str(tmp_path), "nowhere")], check=False)
    assert missing.returncode != 0 and "needs a local directory holding the tokenizer files" in missing.stderr
