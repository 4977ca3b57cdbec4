"""A small byte-level BPE tokenizer trained in-process, laid out like LLaVA's LLaMA tokenizer.

For tests and the demo model; the rest of the library takes any HF tokenizer (LLaMA's real
one included, via `transformers.AutoTokenizer.from_pretrained(dir)`) and reads the special
ids from it. Layout: `<unk>`=0, `<s>`=1, `</s>`=2, learned merges, then `<image>` =
`vocab_size` and `<pad>` = `vocab_size + 1` as added special tokens — the same places as
LLaVA-1.5 (32000, 32001), so the `tiny` model preset (vocab 512, image 500, pad 501) matches
`train_tokenizer(texts, vocab_size=500)`.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

UNK, BOS, EOS, IMAGE, PAD = "<unk>", "<s>", "</s>", "<image>", "<pad>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 500,
                    out_dir: str | os.PathLike | None = None) -> transformers.PreTrainedTokenizerFast:
    """Trains BPE on `texts`; returns a fast tokenizer (saved to `out_dir` if given).

    If the corpus yields fewer than `vocab_size` tokens, the rest are filled with `<unused_i>`
    vocabulary entries (never produced by merges) so `<image>` lands exactly at `vocab_size`.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 3:
        raise ValueError(f"vocab_size={vocab_size} is below the byte alphabet + 3 specials ({len(alphabet) + 3})")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # No prefix space: text between special tokens is tokenized independently, so a prompt
    # tokenized piece by piece equals the same prompt tokenized in one call.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    vocab = tok.get_vocab()
    unused = [f"<unused_{i}>" for i in range(vocab_size - len(vocab))]
    if unused:
        merges = bpe_merges(tok)
        vocab.update({t: len(vocab) + i for i, t in enumerate(unused)})
        trained = tok
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK))
        tok.pre_tokenizer, tok.decoder = trained.pre_tokenizer, trained.decoder
        tok.add_special_tokens([UNK, BOS, EOS])
    tok.add_special_tokens([IMAGE, PAD])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens=[IMAGE])
    if out_dir is not None:
        hf.save_pretrained(os.fspath(out_dir))
    return hf


def bpe_merges(tok: Tokenizer) -> list[tuple[str, str]]:
    """A trained BPE tokenizer's merges as pairs (to rebuild its model with more vocabulary)."""
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
            for m in json.loads(tok.to_str())["model"]["merges"]]


def max_prompt_chars(tokenizer, max_tokens: int) -> int:
    """The most characters a text of `max_tokens` tokens can spell, so a longer one is refused
    before it is tokenized: each token spells at most its vocabulary entry's characters (a
    byte-level or "▁" entry spells no more than its length), times 4 when a normalizer might
    compose several characters into one (NFC/NFKC)."""
    longest = max(map(len, tokenizer.get_vocab()))
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", "unknown")
    return max_tokens * longest * (1 if normalizer is None else 4)


def image_token_id(tokenizer, image_token: str = IMAGE) -> int:
    """The id of `image_token` in `tokenizer`; an error if the tokenizer lacks it."""
    idx = tokenizer.convert_tokens_to_ids(image_token)
    if idx is None or idx == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no token {image_token!r}")
    return idx


def check_matches_model(tokenizer, model_config, image_token: str = IMAGE) -> None:
    """Raises if the tokenizer's image/pad ids differ from the model config's."""
    got = (image_token_id(tokenizer, image_token), tokenizer.pad_token_id)
    want = (model_config.image_token_index, model_config.pad_token_id)
    if got != want:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has (image, pad) ids {got}, "
                         f"model config has (image_token_index, pad_token_id) {want}")
