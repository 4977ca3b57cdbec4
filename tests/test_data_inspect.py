"""`python -m safevlm_jax.data.inspect`: what training sees equals LLaVA's `preprocess_v1` for
the real tokenizer in both layouts; refused records as the build reports them; bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from checkpoints_tools.import_hf import import_hf
from safevlm_jax.checkpoint.format import load_config
from safevlm_jax.data import inspect
from llava_upstream import expand_image, preprocess_v1
from tests.cli_helpers import run_main
from tests.hf_llava import LLAVA_VOCAB, TINY_SAFETY, save_tiny_llava
from tokenizer_helpers import llava_tokenizer, write_llava_tokenizer

ROUNDS = [
    [("<image>\nWhat is shown in this image?", "A red circle on a white background.")],
    [("Describe the picture.\n<image>", "A square."), ("Is it safe?", "Yes, it is harmless.")],
    [("<image>\nWhat colour?", "Green."), ("And the shape?", "A cross."), ("Anything else?", "No.")],
]


@pytest.fixture(scope="module", params=["non_legacy", "legacy"])
def setup(request, tmp_path_factory):
    """A tiny LLaVA checkpoint with the real tokenizer in one layout, records and images."""
    root = tmp_path_factory.mktemp(request.param)
    save_tiny_llava(str(root / "hf"), vocab=LLAVA_VOCAB)
    write_llava_tokenizer(str(root / "hf"), request.param)
    import_hf(str(root / "hf"), str(root / "ckpt"), safety=TINY_SAFETY, log=lambda *a: None)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / "a.png")
    records = [{"id": f"r{i}", "image": "a.png", "safe_level": 0, "safe_type": 6,
                "conversations": [{"from": f, "value": v} for q, a in rounds for f, v in (("human", q), ("gpt", a))]}
               for i, rounds in enumerate(ROUNDS)]
    records += [dict(records[0], id="gone", image="missing.png"), dict(records[1])]  # missing image, duplicate id
    (root / "records.json").write_text(json.dumps(records))
    return request.param, str(root / "ckpt"), root


def run(capsys, *args) -> tuple[int, str, str]:
    return run_main(inspect.main, capsys, *args)


def test_json_output_equals_llava_preprocess_v1_and_reports_refused_records(setup, capsys):
    layout, ckpt, root = setup
    code, out, err = run(capsys, f"--checkpoint={ckpt}", f"--json={root / 'records.json'}",
                         f"--image_root={root}", "--format=json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 5 and "3 records encoded" in err
    tok, n = llava_tokenizer(layout), load_config(ckpt).num_image_tokens
    for rounds, row in zip(ROUNDS, rows):
        ids, labels = expand_image(*preprocess_v1(rounds, tok), 32000, n)
        assert set(row) == {"id", "input_ids", "labels"}
        assert row["input_ids"] == ids and row["labels"] == labels
    assert rows[3] == {"record": "gone", "reason": "missing_image", "detail": rows[3]["detail"]}
    assert rows[4]["record"] == "r1" and rows[4]["reason"] == "duplicate_id"


def test_text_output_marks_the_supervised_tokens(setup, capsys):
    _, ckpt, root = setup
    args = [f"--checkpoint={ckpt}", f"--json={root / 'records.json'}", f"--image_root={root}", "--n=2"]
    _, text, _ = run(capsys, *args)
    _, js, _ = run(capsys, *args, "--format=json")
    lines, rows = text.splitlines(), [json.loads(line) for line in js.splitlines()]
    assert len(lines) == 4 and len(rows) == 2
    for header, tokens, row in zip(lines[::2], lines[1::2], rows):
        supervised = sum(lab != -100 for lab in row["labels"])
        assert header == f"record {row['id']}: {len(row['input_ids'])} tokens (24 image), {supervised} supervised"
        assert tokens.startswith("<s> ▁A ▁chat") and " <image>×24 " in tokens
        inside = [t for run in tokens.split("[[")[1:] for t in run.split("]]")[0].split()]
        assert len(inside) == supervised and inside[-1] == "</s>"
        assert tokens.count("[[") == len(ROUNDS[int(row["id"][1:])])  # one run per answer


@pytest.mark.parametrize("flag,message", [("--json=nope.json", "nope.json"), ("--format=xml", "format"),
                                          ("--checkpoint=nowhere", "nowhere")])
def test_bad_input_is_one_error_line_and_exit_2(setup, capsys, flag, message):
    _, ckpt, root = setup
    args = {"--checkpoint": f"--checkpoint={ckpt}", "--json": f"--json={root / 'records.json'}",
            "--image_root": f"--image_root={root}", "--format": "--format=json"}
    args[flag.split("=")[0]] = flag if "nope" not in flag else f"--json={root / 'nope.json'}"
    code, out, err = run(capsys, *args.values())
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err
