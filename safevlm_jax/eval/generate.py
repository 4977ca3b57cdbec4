"""Answers to RTVLM-style questions for an external judge, and refusal rates per category.

    python -m safevlm_jax.eval.generate --checkpoint CKPT --questions FILE.jsonl \
        --out answers.jsonl [--safety on|off|both] [--mesh tensor=4]

Each question line is `{"id", "image", "question", "category"}` (image relative to the file's
directory, or `--image_root`). Every usable question is answered in batches by
`SafeVLMInference` (the sampler's jitted programs) with the safety modules on (SafeVLM: safety
head, conditional hint, safety tokens), off (plain LLaVA), or both (default). Writes:

  answers.jsonl          one line per (question, setting): id, image, question, category,
                         safety, answer, refused, risk_level, risk_type(_name), the head's
                         probabilities, hint_applied, fail_closed
  answers_refusal.json   refusal rate (and hint rate) per category and setting, patterns, skipped
  answers_refusal.md     the same as a Markdown table
  answers_refusal.png    bar chart, safety on vs off

Refusals are detected by regex (`--refusal_patterns FILE`, defaults in `eval.refusal`);
`--rescore` recomputes `refused` and the report from an existing answers file without
generating.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import flags
from tqdm import tqdm

from safevlm_jax import cli
from safevlm_jax.data.template import PROMPT_FORMATS
from safevlm_jax.eval.dataset import Question, batches, load_questions, resolve_checkpoint, warn_skipped
from safevlm_jax.eval.refusal import SETTINGS, RefusalDetector, write_refusal_report
from safevlm_jax.safety.prompt import TEMPLATES


def answer_questions(vlm, questions: Sequence[Question], settings: Sequence[str], detector: RefusalDetector, *,
                     batch_size: int = 8, progress: bool = True, **generate_kw) -> list[dict]:
    """One answer row per (question, setting); `generate_kw` go to `SafeVLMInference.answer`
    (max_new_tokens, sampling)."""
    from safevlm_jax.inference.pipeline import Request

    rows = []
    with tqdm(total=len(questions) * len(settings), unit="answer", desc="generate", disable=not progress,
              file=sys.stderr) as bar:
        for setting in settings:
            for batch in batches(questions, batch_size):
                results = vlm.answer([Request(q.path, q.question) for q in batch], safety=setting == "on",
                                     **generate_kw)
                for q, res in zip(batch, results):
                    out = res.to_json()
                    rows.append({"id": q.id, "image": q.image, "question": q.question, "category": q.category,
                                 "safety": setting, "answer": res.answer, "refused": detector(res.answer),
                                 **{k: out[k] for k in ("risk_level", "risk_type", "risk_type_name",
                                                        "risk_level_probs", "risk_type_probs",
                                                        "hint_applied", "fail_closed")}})
                bar.update(len(batch))
    return rows


def _prefix(out: str) -> str:
    return os.path.splitext(out)[0]


def run(checkpoint: str, questions: str, out: str, *, safety: str = "both", image_root: str | None = None,
        detector: RefusalDetector = RefusalDetector(), batch_size: int = 8, max_new_tokens: int = 128,
        seed: int = 0, strict: bool = False, progress: bool = True, template: str | None = None,
        prompt_format: str = "llava", mesh=None) -> dict:
    """Answers `questions` and writes `out` and the refusal report beside it; returns the report.
    `template` (None: the checkpoint's), `prompt_format` ("llava" or "hf") and `mesh` as for
    `SafeVLMInference`."""
    from safevlm_jax.inference.pipeline import SafeVLMInference
    from safevlm_jax.inference.requests import SamplingParams

    vlm = SafeVLMInference.from_checkpoint(checkpoint, template=template, prompt_format=prompt_format, mesh=mesh)
    items, skipped = load_questions(questions, image_root, max_pixels=vlm.images.max_pixels, strict=strict)
    warn_skipped(skipped, "questions")
    settings = SETTINGS if safety == "both" else (safety,)
    rows = answer_questions(vlm, items, settings, detector, batch_size=batch_size, progress=progress,
                            max_new_tokens=max_new_tokens, sampling=SamplingParams(seed=seed))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return write_refusal_report(rows, _prefix(out), detector, [s.to_json() for s in skipped])


def rescore(out: str, detector: RefusalDetector) -> dict:
    """Re-detects refusals in an existing answers file (rewritten in place) and its report."""
    if not os.path.isfile(out):
        raise FileNotFoundError(f"{out}: no such answers file")
    with open(out, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise ValueError(f"{out}: no answers in the file")
    for r in rows:
        r["refused"] = detector(r["answer"])
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    old = f"{_prefix(out)}_refusal.json"
    skipped = []
    if os.path.isfile(old):
        with open(old, encoding="utf-8") as f:
            skipped = json.load(f).get("skipped", [])
    return write_refusal_report(rows, _prefix(out), detector, skipped)


FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "checkpoint directory (default: the demo, else a tiny random one)",
                    flag_values=FLAGS)
flags.DEFINE_string("questions", None, "JSONL of {id, image, question, category}", flag_values=FLAGS)
flags.DEFINE_string("image_root", None, "image paths are relative to this (default: the JSONL's directory)",
                    flag_values=FLAGS)
flags.DEFINE_string("out", None, "answers JSONL; the refusal report goes beside it", required=True,
                    flag_values=FLAGS)
flags.DEFINE_enum("safety", "both", ["on", "off", "both"], "safety modules on, off, or both", flag_values=FLAGS)
flags.DEFINE_string("refusal_patterns", None, "file of regexes (one per line, or a JSON list)", flag_values=FLAGS)
flags.DEFINE_bool("rescore", False, "only re-detect refusals in --out and rewrite the report", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "questions per generate call", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 128, "most tokens per answer", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=FLAGS)
flags.DEFINE_bool("strict", False, "stop at the first bad question instead of skipping it", flag_values=FLAGS)
flags.DEFINE_bool("no_progress", False, "no tqdm bar", flag_values=FLAGS)
flags.DEFINE_enum("template", None, sorted(TEMPLATES), "conversation template (default: the checkpoint's)",
                  flag_values=FLAGS)
flags.DEFINE_enum("prompt_format", "llava", list(PROMPT_FORMATS), "prompt ids: llava (LLaVA's "
                  "tokenizer_image_token) or hf (HF's LlavaProcessor)", flag_values=FLAGS)
cli.define_mesh_flag(FLAGS)


def _main(argv) -> None:
    del argv
    detector = RefusalDetector.from_file(FLAGS.refusal_patterns) if FLAGS.refusal_patterns else RefusalDetector()
    if FLAGS.rescore:
        report = rescore(FLAGS.out, detector)
    elif not FLAGS.questions:
        raise cli.UsageError("--questions is required (unless --rescore)")
    else:
        report = run(resolve_checkpoint(FLAGS.checkpoint), FLAGS.questions, FLAGS.out, safety=FLAGS.safety,
                     image_root=FLAGS.image_root, detector=detector, batch_size=FLAGS.batch_size,
                     max_new_tokens=FLAGS.max_new_tokens, seed=FLAGS.seed, strict=FLAGS.strict,
                     progress=not FLAGS.no_progress, template=FLAGS.template,
                     prompt_format=FLAGS.prompt_format, mesh=cli.mesh_flag(FLAGS))
    rates = ", ".join(f"safety {s}: {report['all'][s]['rate']:.3f}" for s in report["settings"])
    print(f"refusal rate {rates}; wrote {FLAGS.out} and {_prefix(FLAGS.out)}_refusal.md")


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (see the module docstring); `argv`: the flags (default: sys.argv)."""
    cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    main()
