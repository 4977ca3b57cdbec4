"""Tokenizers for tests: one laid out as LLaMA's (SentencePiece-style) trained in-process, and
the real LLaMA/Vicuna tokenizer of LLaVA-1.5 in the layouts found in the wild.

The real one is `tests/data/llama_tokenizer/tokenizer.model` (its README says where it comes
from and its license): the LLaMA-2 SentencePiece model (32000 pieces) that Vicuna-1.5 and
LLaVA-1.5 use. Converting it takes seconds, so it is
converted once per test session and every layout is derived from that conversion.
"""

import atexit
import functools
import json
import os
import shutil
import tempfile

import pytest
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from safevlm_jax.data.tokenizer import bpe_merges

LLAMA_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "llama_tokenizer")
# How transformers 5 (and 4) lays out the real tokenizer, as llava-hf ships it plus `<image>`
# = 32000 and `<pad>` = 32001:
#   non_legacy:       tokenizer.json with Metaspace(prepend_scheme="first"), config legacy: false
#                     (Vicuna-1.5's and llava-hf's layout; no word-start marker after a special)
#   legacy:           transformers 4's legacy tokenizer.json (Prepend("▁") + Replace normalizer,
#                     no pre-tokenizer), config legacy: true (a "▁" starts every text stretch)
#   metaspace_always: Metaspace(prepend_scheme="always") and no `legacy` key in the config:
#                     transformers 5's LlamaTokenizer would rebuild it as non-legacy
REAL_LAYOUTS = ("non_legacy", "legacy", "metaspace_always")
LEGACY = {"non_legacy": False, "legacy": True, "metaspace_always": True}


def llama_style_tokenizer(texts) -> transformers.PreTrainedTokenizerFast:
    """Laid out as LLaMA's tokenizer.json: BPE over "▁"-marked text with a "▁" prepended to
    every piece between special tokens, byte fallback <0x00>..<0xFF> in the vocabulary."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # trained on words, as SentencePiece pieces never span a "▁" inside (LLaMA's file then
    # has no pre-tokenizer)
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    vocab = tok.get_vocab()
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    llama = Tokenizer(models.BPE(vocab=vocab, merges=bpe_merges(tok), unk_token="<unk>", byte_fallback=True,
                                 fuse_unk=True))
    llama.normalizer = tok.normalizer
    llama.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])
    llama.add_special_tokens(["<unk>", "<s>", "</s>", "<image>", "<pad>"])
    llama.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=llama, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>", extra_special_tokens=["<image>"])


def write_llava_tokenizer(out_dir: str, layout: str = "non_legacy") -> str:
    """Writes the real tokenizer in `layout` (`REAL_LAYOUTS`) into `out_dir` as an HF LLaVA-1.5
    directory holds it: tokenizer.json, tokenizer.model, tokenizer_config.json (class
    LlamaTokenizer, pad `<pad>`), special_tokens_map.json. Returns `out_dir`."""
    src = _layouts_dir()
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(os.path.join(src, layout)):
        shutil.copy2(os.path.join(src, layout, name), os.path.join(out_dir, name))
    return out_dir


def llava_tokenizer(layout: str = "non_legacy"):
    """The real tokenizer in `layout` as transformers 5 loads an HF LLaVA directory
    (`TokenizersBackend`, tokenizer.json as written). `.legacy` is set as transformers 4's
    `LlamaTokenizerFast` had it (LLaVA's `preprocess_v1` reads it). A fresh object per call."""
    tok = transformers.TokenizersBackend.from_pretrained(os.path.join(_layouts_dir(), layout))
    tok.legacy = LEGACY[layout]
    return tok


@functools.cache
def _layouts_dir() -> str:
    """Converts tokenizer.model once (transformers 5, non-legacy) and derives every layout."""
    model = os.path.join(LLAMA_TOKENIZER, "tokenizer.model")
    if not os.path.isfile(model):
        pytest.fail(f"{model} is missing: the real LLaMA/Vicuna tokenizer (LLaMA-2's SentencePiece model, "
                    f"md5 eeec4125e9c7560836b4873b6f8e3025) is committed with the tests "
                    f"(see tests/data/llama_tokenizer/README.md)", pytrace=False)
    root = tempfile.mkdtemp(prefix="llava_tokenizer_")
    atexit.register(shutil.rmtree, root, True)
    tok = transformers.AutoTokenizer.from_pretrained(LLAMA_TOKENIZER, legacy=False)
    # as llava-hf's conversion script adds them
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    base = json.loads(tok.backend_tokenizer.to_str())
    with open(os.path.join(LLAMA_TOKENIZER, "tokenizer_config.json")) as f:
        config = json.load(f)
    config.update(pad_token="<pad>", added_tokens_decoder={
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in base["added_tokens"]})
    for layout in REAL_LAYOUTS:
        data, cfg = json.loads(json.dumps(base)), dict(config, legacy=LEGACY[layout])
        if layout == "legacy":
            data["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                                      {"type": "Replace", "pattern": {"String": " "},
                                                                       "content": "▁"}]}
            data["pre_tokenizer"] = None
        elif layout == "metaspace_always":
            data["pre_tokenizer"]["prepend_scheme"] = "always"
            del cfg["legacy"]
        out = os.path.join(root, layout)
        os.makedirs(out)
        shutil.copy2(model, out)
        with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
            json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, f)
    return root
