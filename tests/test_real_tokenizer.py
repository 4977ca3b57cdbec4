"""The real LLaMA/Vicuna tokenizer of LLaVA-1.5 (tests/data/llama_tokenizer, each layout of
tokenizer_helpers): the ids LLaVA's own code gives, conversions that keep the tokenizer's ids,
and `--prompt_format hf` equal to HF's LlavaProcessor and greedy tokens equal to HF generate."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from checkpoints_tools.export_hf import export_hf
from checkpoints_tools.import_hf import import_hf
from safevlm_jax import sample
from safevlm_jax.checkpoint.assets import image_config
from safevlm_jax.checkpoint.format import load_config
from safevlm_jax.checkpoint.tokenizer_files import SOURCE_CLASS_KEY
from safevlm_jax.data.records import GPT, HUMAN, Turn
from safevlm_jax.data.template import VICUNA_SYSTEM, TextEncoder
from safevlm_jax.data.tokenizer import train_tokenizer
from safevlm_jax.inference.pipeline import load_image
from llava_upstream import expand_image, tokenizer_image_token, vicuna_v1_prompt
from tests.cli_helpers import run_main
from tests.hf_llava import LLAVA_VOCAB, TINY_SAFETY, save_tiny_llava
from tokenizer_helpers import REAL_LAYOUTS, llama_style_tokenizer, llava_tokenizer, write_llava_tokenizer

QUESTION = "What is shown in this image?"
OTHER_PROBES = ["</s>USER: hi", "  two leading spaces", "\nA newline first", "日本語 émigré", "<pad><unk> x"]
N_IMAGE = 16  # the tiny LLaVA's (28 / 7)^2 patches, safety off


def ids(tokenizer, text):
    return tokenizer(text)["input_ids"]


def hf_prompt(question):
    return f"{VICUNA_SYSTEM} USER: <image>\n{question} ASSISTANT:"


def image_processor():
    return transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})


def llava_processor(tokenizer):
    """HF's LlavaProcessor for the tiny LLaVA (28 px, patch 7: N_IMAGE positions), in-process."""
    return transformers.LlavaProcessor(image_processor=image_processor(), tokenizer=tokenizer, patch_size=7,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1)


def test_each_layout_splits_text_after_a_special_token_as_the_wild_does():
    for layout in REAL_LAYOUTS:
        tok = llava_tokenizer(layout)
        after_eos = tok.convert_ids_to_tokens(tok("</s>USER", add_special_tokens=False)["input_ids"])
        assert after_eos == (["</s>", "USER"] if layout == "non_legacy" else ["</s>", "▁US", "ER"]), layout
        assert tok.convert_tokens_to_ids(["USER", "<image>", "<pad>"]) == [11889, 32000, 32001]
        # LLaVA tokenizes the text after <image> on its own: "▁" "<0x0A>" in every layout
        assert tokenizer_image_token("USER: <image>\nHi", tok)[5:8] == [-200, 29871, 13]


@pytest.mark.parametrize("layout", REAL_LAYOUTS)
def test_training_ids_follow_the_tokenizer_after_eos(layout):
    tok = llava_tokenizer(layout)
    encoder = TextEncoder(tok, 4, max_len=1024)
    turns = [Turn(HUMAN, QUESTION), Turn(GPT, "A cat."), Turn(HUMAN, "Sure?"), Turn(GPT, "Yes.")]
    got, labels = encoder.encode(turns)
    eos = int(np.flatnonzero(got == tok.eos_token_id)[0])
    want = [2, 11889] if layout == "non_legacy" else [2, tok.convert_tokens_to_ids("▁US")]
    assert got[eos:eos + 2].tolist() == want and labels[eos] == 2 and labels[eos + 1] == -100


@pytest.mark.parametrize("layout", REAL_LAYOUTS)
def test_hf_prompt_format_equals_llava_processor_and_llava_format_equals_tokenizer_image_token(layout):
    tok = llava_tokenizer(layout)
    image = Image.fromarray(np.zeros((28, 28, 3), np.uint8))
    hf = llava_processor(tok)(images=image, text=hf_prompt(QUESTION), return_tensors="np")["input_ids"][0].tolist()
    turns = [Turn(HUMAN, QUESTION)]
    ours_hf = TextEncoder(tok, N_IMAGE, 1024, prompt_format="hf").encode_prompt(turns).tolist()
    ours_llava = TextEncoder(tok, N_IMAGE, 1024).encode_prompt(turns).tolist()
    llava = tokenizer_image_token(vicuna_v1_prompt([(QUESTION, None)]), tok)
    assert ours_hf == hf
    assert ours_llava == expand_image(llava, llava, 32000, N_IMAGE)[0]
    after = hf.index(32000) + N_IMAGE  # the newline after the image: "▁" "<0x0A>" in LLaVA's
    assert ours_llava[after:after + 2] == [29871, 13]  # convention; HF's drops the "▁" where the
    assert (hf[after] == 13) == (ours_hf != ours_llava) == (layout == "non_legacy")  # tokenizer does


def _tokenizer_cases():
    corpus = [VICUNA_SYSTEM, "USER: ASSISTANT:", QUESTION, "It is a cat."] * 5
    return {**{f"real_{layout}": (lambda d, layout=layout: write_llava_tokenizer(d, layout)) for layout in REAL_LAYOUTS},
            "byte_level": lambda d: train_tokenizer(corpus, vocab_size=500, out_dir=d),
            "llama_style": lambda d: llama_style_tokenizer(corpus).save_pretrained(d)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each tokenizer in a tiny HF LLaVA directory, imported (import_hf) and exported again."""
    root, out = tmp_path_factory.mktemp("tokenizers"), {}
    for name, write in _tokenizer_cases().items():
        src = str(root / name / "hf")
        save_tiny_llava(src)
        write(src)
        image_processor().save_pretrained(src)
        import_hf(src, str(root / name / "ckpt"), safety=TINY_SAFETY, log=lambda *a: None)
        export_hf(str(root / name / "ckpt"), str(root / name / "out"), log=lambda *a: None)
        out[name] = [str(root / name / d) for d in ("hf", "ckpt", "out")]
    return out


@pytest.mark.parametrize("name", sorted(_tokenizer_cases()))
def test_import_and_export_keep_the_source_tokenizers_ids(converted, name):
    src, ckpt, out = converted[name]
    source = transformers.AutoTokenizer.from_pretrained(src)
    for other in (transformers.AutoTokenizer.from_pretrained(ckpt),  # what the library loads
                  transformers.AutoTokenizer.from_pretrained(out),
                  transformers.LlavaProcessor.from_pretrained(src).tokenizer):
        for text in [vicuna_v1_prompt([(QUESTION, "It is a cat."), ("And the colour?", None)]), *OTHER_PROBES]:
            assert ids(other, text) == ids(source, text), (name, text)
    with open(os.path.join(src, "tokenizer_config.json")) as f, open(os.path.join(out, "tokenizer_config.json")) as g:
        declared, exported = json.load(f), json.load(g)
    assert exported.get("tokenizer_class") == declared.get("tokenizer_class") and SOURCE_CLASS_KEY not in exported


def test_without_the_pinned_class_transformers_would_change_the_ids(converted):
    """The failure the pinned class prevents: LlamaTokenizer (the class the files declare, which
    AutoTokenizer picks next to our config.json) rebuilds an "always" tokenizer as non-legacy."""
    src, ckpt, _ = converted["real_metaspace_always"]
    with open(os.path.join(ckpt, "tokenizer_config.json")) as f:
        config = json.load(f)
    assert config["tokenizer_class"] == "TokenizersBackend" and config[SOURCE_CLASS_KEY] == "LlamaTokenizer"
    rebuilt = transformers.LlamaTokenizer.from_pretrained(src)
    assert ids(rebuilt, "</s>USER") != ids(transformers.AutoTokenizer.from_pretrained(src), "</s>USER")


@pytest.fixture(scope="module")
def real_llava(tmp_path_factory):
    """A tiny random LLaVA with llava-hf's vocabulary (32064) and the real non-legacy tokenizer,
    imported; an image file."""
    root = tmp_path_factory.mktemp("real_llava")
    hf = save_tiny_llava(str(root / "hf"), vocab=LLAVA_VOCAB, seed=3)
    write_llava_tokenizer(str(root / "hf"), "non_legacy")
    import_hf(str(root / "hf"), str(root / "ckpt"), safety=TINY_SAFETY, log=lambda *a: None)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / "a.png")
    return hf, str(root / "hf"), str(root / "ckpt"), str(root / "a.png")


def run_sample(capsys, *args) -> dict:
    code, out, err = run_main(sample.main, capsys, *args)
    assert code == 0, err
    return json.loads(out)


def test_sample_hf_format_gives_llava_processor_ids_and_hf_generate_greedy_tokens(real_llava, capsys):
    hf, src, ckpt, image = real_llava
    args = [f"--checkpoint={ckpt}", f"--image={image}", f"--prompt={QUESTION}", "--safety=off", "--json",
            "--max_new_tokens=8"]
    got = run_sample(capsys, *args, "--prompt_format=hf")
    processor = llava_processor(transformers.AutoTokenizer.from_pretrained(src))
    want = processor(images=Image.open(image), text=hf_prompt(QUESTION), return_tensors="pt")["input_ids"]
    assert got["prompt_token_ids"] == want[0].tolist()
    pixels = load_image(image, image_config(ckpt, load_config(ckpt)))  # the same pixels for both
    with torch.no_grad():
        out = hf.generate(input_ids=want, attention_mask=torch.ones_like(want), max_new_tokens=8, do_sample=False,
                          pixel_values=torch.from_numpy(pixels[None].transpose(0, 3, 1, 2)),
                          eos_token_id=2, pad_token_id=32001)
    assert got["token_ids"] == out[0, want.shape[1]:].tolist()
    llava = run_sample(capsys, *args)  # the default: LLaVA's own prompt (tokenizer_image_token)
    ref = tokenizer_image_token(vicuna_v1_prompt([(QUESTION, None)]),
                                transformers.AutoTokenizer.from_pretrained(src))
    assert llava["prompt_token_ids"] == expand_image(ref, ref, 32000, N_IMAGE)[0] != got["prompt_token_ids"]
