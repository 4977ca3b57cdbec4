"""LLaVA-1.5's own text code, for parity tests: `conv_vicuna_v1` (llava/conversation.py),
`tokenizer_image_token` (llava/mm_utils.py), `preprocess_multimodal` and `preprocess_v1`
(llava/train/train.py) from haotian-liu/LLaVA's PyPI release, which the test setup installs
beside the tests without its dependencies (its pinned torch and transformers would replace the
project's):

    .venv/bin/pip install --no-deps --target tests/.llava llava-torch==1.2.2.post1

`llava/__init__.py` imports LLaVA's model classes, which transformers 5 lacks, so it is never
run: `llava` here is a bare package over the installed folder, from which `llava.conversation`,
`llava.mm_utils` and `llava.constants` import as they are. `preprocess_*` live in
llava/train/train.py, whose imports pull the model too: the two functions are taken from that
file's source and run with its other imports and its `IS_TOKENIZER_GREATER_THAN_0_14`.
Loaded on first use, so a missing install fails the tests that need it, naming the command.
"""

from __future__ import annotations

import ast
import functools
import importlib
import os
import sys
import types

import pytest

INSTALL = "pip install --no-deps --target tests/.llava llava-torch==1.2.2.post1"
TARGET = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".llava")
DIST_INFO = "llava_torch-1.2.2.post1.dist-info"
# train.py's imports that pull LLaVA's model classes (written for transformers 4)
MODEL_IMPORTS = ("llava.model", "llava.train.llava_trainer")
TAKEN = ("IS_TOKENIZER_GREATER_THAN_0_14", "preprocess_multimodal", "preprocess_v1")


@functools.cache
def llava() -> types.SimpleNamespace:
    """LLaVA's `conversation`, `mm_utils` and `constants` modules and its `preprocess_*`."""
    if not os.path.isdir(os.path.join(TARGET, DIST_INFO)):
        pytest.fail(f"LLaVA's own code (llava-torch 1.2.2.post1) is missing from {TARGET}; the parity tests "
                    f"compare against it: run `{INSTALL}` in the repository root", pytrace=False)
    if "llava" not in sys.modules:
        package = types.ModuleType("llava")
        package.__path__ = [os.path.join(TARGET, "llava")]
        sys.modules["llava"] = package
    path = os.path.join(TARGET, "llava", "train", "train.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    body = [node for node in tree.body
            if isinstance(node, ast.Import) and not any(a.name.startswith(MODEL_IMPORTS) for a in node.names)
            or isinstance(node, ast.ImportFrom) and not (node.module or "").startswith(MODEL_IMPORTS)
            or isinstance(node, ast.FunctionDef) and node.name in TAKEN
            or isinstance(node, ast.Assign) and any(getattr(t, "id", None) in TAKEN for t in node.targets)]
    train = {"__name__": "llava.train.train"}
    exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), train)
    missing = [name for name in TAKEN if name not in train]
    assert not missing, f"{path} has no {missing}"
    return types.SimpleNamespace(conversation=importlib.import_module("llava.conversation"),
                                 mm_utils=importlib.import_module("llava.mm_utils"),
                                 constants=importlib.import_module("llava.constants"),
                                 **{name: train[name] for name in TAKEN})


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """LLaVA's ids of a prompt text, with `IMAGE_TOKEN_INDEX` (-200) for `<image>`."""
    return llava().mm_utils.tokenizer_image_token(prompt, tokenizer)


def _sources(rounds) -> list[list[dict]]:
    """One LLaVA record's conversation after `preprocess_multimodal` (which puts "<image>\\n"
    in front of the stripped first question; a record without `<image>` gets it there)."""
    turns = [{"from": f, "value": v} for q, a in rounds for f, v in (("human", q), ("gpt", a)) if v is not None]
    if "<image>" not in turns[0]["value"]:
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
    args = types.SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False)
    return llava().preprocess_multimodal([turns], args)


def vicuna_v1_prompt(rounds) -> str:
    """`conv_vicuna_v1.get_prompt()` of `rounds` ([(question, answer)]) as training sees them; a
    last answer None gives a generation prompt ending with "ASSISTANT:", as LLaVA's inference
    appends None."""
    conv = llava().conversation.conv_vicuna_v1.copy()
    roles = {"human": conv.roles[0], "gpt": conv.roles[1]}
    for turn in _sources(rounds)[0]:
        conv.append_message(roles[turn["from"]], turn["value"])
    if rounds[-1][1] is None:
        conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def preprocess_v1(rounds, tokenizer) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record as LLaVA's `preprocess_v1(..., has_image=True)` gives
    them, `IMAGE_TOKEN_INDEX` for the image. `tokenizer.legacy` must be set: LLaVA reads it."""
    out = llava().preprocess_v1(_sources(rounds), tokenizer, has_image=True)
    return out["input_ids"][0].tolist(), out["labels"][0].tolist()


def expand_image(ids, labels, image_id: int, n: int) -> tuple[list[int], list[int]]:
    """LLaVA's single `IMAGE_TOKEN_INDEX` -> n image positions (ignored in the labels), as its
    model expands the image features."""
    constants = llava().constants
    out_ids, out_labels = [], []
    for i, label in zip(ids, labels):
        image = i == constants.IMAGE_TOKEN_INDEX
        out_ids += [image_id] * n if image else [i]
        out_labels += [constants.IGNORE_INDEX] * n if image else [label]
    return out_ids, out_labels
