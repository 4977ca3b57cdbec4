"""A tokenizer laid out as LLaMA's (SentencePiece-style), trained in-process for tests."""

import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from safevlm_jax.data.tokenizer import bpe_merges


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
