"""A checkpoint's tokenizer files load, with transformers, exactly as where they came from.

transformers 5 picks the tokenizer class from the whole directory: in an HF LLaVA directory
(`config.json` of model type "llava") `AutoTokenizer` loads `TokenizersBackend`, i.e.
`tokenizer.json` as written; in a checkpoint of ours (our own `config.json`) it goes by
`tokenizer_config.json`'s `tokenizer_class`, and `LlamaTokenizer` rebuilds the pre-tokenizer
from that file (no `legacy` key = non-legacy, and transformers 5 writes none), so a legacy or
`prepend_scheme="always"` tokenizer would tokenize differently after the import.

So when tokenizer files are copied into a checkpoint, `tokenizer_config.json` names the class
`AutoTokenizer` chose in the source directory (the class it declared is kept under
`SOURCE_CLASS_KEY`), and an HF export puts the declared class back.
"""

from __future__ import annotations

import json
import os

TOKENIZER_CONFIG = "tokenizer_config.json"
SOURCE_CLASS_KEY = "safevlm_source_tokenizer_class"


def pin_tokenizer_class(src_dir: str, dst_dir: str) -> None:
    """After `src_dir`'s tokenizer files were copied to `dst_dir`: `dst_dir`'s config names
    the class `AutoTokenizer` loads in `src_dir` (no-op without a tokenizer_config.json)."""
    path = os.path.join(dst_dir, TOKENIZER_CONFIG)
    if not os.path.isfile(path):
        return
    import transformers

    try:
        chosen = type(transformers.AutoTokenizer.from_pretrained(src_dir)).__name__
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{src_dir}: its tokenizer does not load ({e})") from e
    config = _read(path)
    if config.get("tokenizer_class") != chosen:
        config.setdefault(SOURCE_CLASS_KEY, config.get("tokenizer_class"))
        config["tokenizer_class"] = chosen
        _write(path, config)


def restore_tokenizer_class(directory: str) -> None:
    """For an HF export in `directory`: the tokenizer class the files declared before import."""
    path = os.path.join(directory, TOKENIZER_CONFIG)
    if not os.path.isfile(path):
        return
    config = _read(path)
    if SOURCE_CLASS_KEY in config:
        declared = config.pop(SOURCE_CLASS_KEY)
        config.pop("tokenizer_class", None)
        if declared is not None:
            config["tokenizer_class"] = declared
        _write(path, config)


def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e


def _write(path: str, config: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
