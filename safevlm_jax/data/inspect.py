"""What training sees for each record: its token ids, with the supervised ones marked.

    python -m safevlm_jax.data.inspect --checkpoint CKPT --json RECORDS.json --image_root DIR \\
        [--n K] [--format text|json] [--template NAME] [--max_length 2048]

The checkpoint gives the tokenizer, the image positions (`ModelConfig.num_image_tokens`) and
the conversation template it records (`--template` overrides); records are checked as the
dataset build checks them (`records.check_records`) and encoded by the training pipeline's
`TextEncoder`, truncation at `--max_length` included.

  --format text: per record a header line, then its tokens (the tokenizer's pieces, separated
                 by spaces; a run of image positions as `<image>×N`), every run of supervised
                 tokens (those with a label) between `[[` and `]]`.
  --format json: one JSON object per line, {"id", "input_ids", "labels"} (labels -100 where
                 unsupervised; image positions expanded as the model sees them).
A refused record gives, in either format, the line `report.json` of a dataset build lists it
with: {"record", "reason", "detail"} (`errors.REASONS`). A summary goes to stderr.
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Iterator

import numpy as np
from absl import flags

from safevlm_jax import cli
from safevlm_jax.data.errors import BadRecord
from safevlm_jax.data.images import DEFAULT_MAX_PIXELS
from safevlm_jax.data.records import check_records, load_json
from safevlm_jax.data.template import ALIASES, IGNORE_INDEX, TEMPLATES, TextEncoder


def inspect_records(json_path: str, image_root: str, encoder: TextEncoder, n: int | None = None,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[dict]:
    """The first `n` records of `json_path` (all if None) as training encodes them:
    {"id", "input_ids", "labels"} (int lists), or a refused record's {"record", "reason",
    "detail"}."""
    raw = load_json(json_path)
    for record, _ in check_records(raw[:n] if n is not None else raw, image_root, max_pixels):
        if isinstance(record, BadRecord):
            yield record.to_json()
            continue
        ids, labels = encoder.encode(record.turns, example_id=record.id)
        yield {"id": record.id, "input_ids": ids.tolist(), "labels": labels.tolist()}


def render(row: dict, tokenizer, image_token_id: int) -> str:
    """One encoded record as text: a header line, then its pieces with `[[` `]]` around
    supervised runs and each image run as `<image>×N`."""
    ids, labels = np.asarray(row["input_ids"]), np.asarray(row["labels"])
    supervised = labels != IGNORE_INDEX
    pieces = []  # (text, supervised)
    for is_image, run in itertools.groupby(zip(ids.tolist(), supervised.tolist()),
                                           key=lambda t: t[0] == image_token_id):
        run = list(run)
        pieces += ([(f"<image>×{len(run)}", False)] if is_image
                   else [(tokenizer.convert_ids_to_tokens(tok), sup) for tok, sup in run])
    out, inside = [], False
    for piece, sup in pieces:
        if sup != inside:
            out.append("[[" if sup else "]]")
            inside = sup
        out.append(piece)
    if inside:
        out.append("]]")
    header = (f"record {row['id']}: {len(ids)} tokens ({int((ids == image_token_id).sum())} image), "
              f"{int(supervised.sum())} supervised")
    return header + "\n" + " ".join(out)


FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "checkpoint directory (tokenizer, config, template)", required=True,
                    flag_values=FLAGS)
flags.DEFINE_string("json", None, "SafeVLM JSON file (a list of records)", required=True, flag_values=FLAGS)
flags.DEFINE_string("image_root", None, "directory the records' image paths are relative to", required=True,
                    flag_values=FLAGS)
flags.DEFINE_integer("n", None, "only the first N records of the file", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum("format", "text", ["text", "json"], "text: marked tokens; json: one object per record",
                  flag_values=FLAGS)
flags.DEFINE_enum("template", None, sorted({*TEMPLATES, *ALIASES}), "conversation template (default: the checkpoint's)",
                  flag_values=FLAGS)
flags.DEFINE_integer("max_length", 2048, "longest training sequence (config.data.max_length)", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("max_pixels", DEFAULT_MAX_PIXELS, "images with more pixels are refused (image_too_large)",
                     flag_values=FLAGS)


def _main(argv) -> None:
    del argv
    import transformers

    from safevlm_jax.checkpoint.format import load_config, load_template
    from safevlm_jax.data.tokenizer import check_matches_model

    config = load_config(FLAGS.checkpoint)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(FLAGS.checkpoint)
    except (OSError, TypeError) as e:
        raise ValueError(f"{FLAGS.checkpoint}: no tokenizer loads from it ({e})") from e
    check_matches_model(tokenizer, config)
    encoder = TextEncoder(tokenizer, config.num_image_tokens, FLAGS.max_length,
                          template=FLAGS.template or load_template(FLAGS.checkpoint))
    shown, skipped = 0, {}
    for row in inspect_records(FLAGS.json, FLAGS.image_root, encoder, FLAGS.n, FLAGS.max_pixels):
        if "reason" in row:
            skipped[row["reason"]] = skipped.get(row["reason"], 0) + 1
        else:
            shown += 1
        text = json.dumps(row, ensure_ascii=False) if FLAGS.format == "json" or "reason" in row \
            else render(row, tokenizer, encoder.image_token_id)
        print(text, flush=True)
    print(f"{shown} records encoded (template {encoder.template.name!r}, {encoder.num_truncated} truncated), "
          f"skipped {skipped}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring); `argv`: the flags (default: sys.argv)."""
    cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    main()
