"""Ask SafeVLM about an image: the safety verdict, then the answer, streamed.

    python -m safevlm_jax.sample --checkpoint CKPT --image cat.jpg --prompt "What is this?"
    python -m safevlm_jax.sample --image cat.jpg --prompt "..." --json
    python -m safevlm_jax.sample --batch_file requests.jsonl > answers.jsonl
    python -m safevlm_jax.sample --checkpoint CKPT --image cat.jpg --prompt "..." --prompt_format hf --safety off --json
    python -m safevlm_jax.sample --checkpoint CKPT --image cat.jpg --prompt "..." --mesh tensor=4   # sharded

`--json` prints the answer, the verdict and `prompt_token_ids` (the exact ids fed to the model,
each image expanded to its positions). `--prompt_format hf` gives the prompt ids HF's
`LlavaProcessor` gives (so greedy tokens equal HF `generate` on the same weights); the default,
`llava`, gives LLaVA's own (`tokenizer_image_token`).

Without --checkpoint it uses the demo checkpoint in `safevlm_jax/assets/demo/` if present,
else a tiny *random, untrained* checkpoint created on first use in the cache directory
(`$SAFEVLM_CACHE`, default `~/.cache/safevlm_jax`), announced on stderr
(`safevlm_jax.checkpoint.demo`).
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from safevlm_jax import cli
from safevlm_jax.checkpoint.demo import resolve_checkpoint
from safevlm_jax.data.template import PROMPT_FORMATS
from safevlm_jax.inference.errors import BadRequest
from safevlm_jax.inference.pipeline import Request, SafeVLMInference
from safevlm_jax.inference.requests import SamplingParams
from safevlm_jax.safety.hints import HintConfig, load_hints
from safevlm_jax.safety.policy import RiskPolicy, load_policy
from safevlm_jax.safety.prompt import TEMPLATES

FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "checkpoint directory (default: demo or random tiny)", flag_values=FLAGS)
flags.DEFINE_string("image", None, "local image file (JPEG/PNG/WebP)", flag_values=FLAGS)
flags.DEFINE_string("prompt", None, "the question about the image", flag_values=FLAGS)
flags.DEFINE_string("batch_file", None, "JSONL file of {\"image\", \"prompt\"}; writes JSONL to stdout",
                    flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "rows per generate call with --batch_file", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 128, "most tokens to generate", flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.0, "0 = greedy", flag_values=FLAGS)
flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0 = off; with --top_p: both)",
                     flag_values=FLAGS)
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1 = off)", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=FLAGS)
flags.DEFINE_enum("safety", "on", ["on", "off"], "off: plain LLaVA (no head, hint or safety tokens)",
                  flag_values=FLAGS)
flags.DEFINE_enum("template", None, sorted(TEMPLATES), "conversation template (default: the one the "
                  "checkpoint records; LLaVA-1.5's v1 = llava_v1 for older checkpoints)", flag_values=FLAGS)
flags.DEFINE_enum("prompt_format", "llava", list(PROMPT_FORMATS), "prompt token ids: llava = LLaVA's "
                  "tokenizer_image_token (what LLaVA-1.5 was trained on), hf = what HF's LlavaProcessor "
                  "gives the same text", flag_values=FLAGS)
flags.DEFINE_string("hints", None, "JSON/YAML file replacing hint texts (see safevlm_jax.safety.hints.load_hints)",
                    flag_values=FLAGS)
flags.DEFINE_string("policy", None, "risk policy JSON/YAML file (see safevlm_jax.safety.policy; default: the "
                    "paper's rules)", flag_values=FLAGS)
flags.DEFINE_bool("json", False, "print one JSON object instead of streaming text", flag_values=FLAGS)
cli.define_mesh_flag(FLAGS)


def _read_batch(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from e
            if not isinstance(row, dict) or not isinstance(row.get("image"), str) \
                    or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{n}: expected {{\"image\": str, \"prompt\": str}}, got {line.strip()!r}")
            rows.append(row)
    return rows


def run_batch(vlm: SafeVLMInference, path: str, out, size: int, **kw) -> None:
    """Answers every line of `path` in batches of `size`, writing one JSON line per input
    (the input's fields plus the result, or its own error); timings are per batch."""
    from tqdm import tqdm

    rows = _read_batch(path)
    for start in tqdm(range(0, len(rows), size), desc="batches", unit="batch", file=sys.stderr):
        chunk = rows[start:start + size]
        requests = [Request(r["image"], r["prompt"]) for r in chunk]
        try:
            results = [r.to_json() for r in vlm.answer(requests, **kw)]
        except BadRequest:  # one bad image or prompt: answer the others one by one
            results = []
            for req in requests:
                try:
                    results.append(vlm.answer([req], **kw)[0].to_json())
                except BadRequest as e:
                    results.append({"error": str(e)})
        for row, result in zip(chunk, results):
            out.write(json.dumps({**row, **result}, ensure_ascii=False) + "\n")
        out.flush()


def run(argv) -> None:
    """The command, after flag parsing (raises ValueError with a message for bad input)."""
    del argv
    if not FLAGS.batch_file and not (FLAGS.image and FLAGS.prompt is not None):
        raise cli.UsageError("give --image and --prompt, or --batch_file")
    hints = load_hints(FLAGS.hints) if FLAGS.hints else HintConfig()
    policy = load_policy(FLAGS.policy) if FLAGS.policy else RiskPolicy()
    sampling = SamplingParams(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.seed).check()
    if FLAGS.image and not FLAGS.batch_file and not os.path.isfile(FLAGS.image):
        raise ValueError(f"cannot read image {FLAGS.image}: no such file")
    vlm = SafeVLMInference.from_checkpoint(resolve_checkpoint(FLAGS.checkpoint),
                                           template=FLAGS.template, hints=hints, policy=policy,
                                           prompt_format=FLAGS.prompt_format, mesh=cli.mesh_flag(FLAGS))
    kw = dict(max_new_tokens=FLAGS.max_new_tokens, sampling=sampling, safety=FLAGS.safety == "on")
    if FLAGS.batch_file:
        return run_batch(vlm, FLAGS.batch_file, sys.stdout, FLAGS.batch_size, **kw)
    request = [Request(FLAGS.image, FLAGS.prompt)]
    if FLAGS.json:
        print(json.dumps(vlm.answer(request, **kw)[0].to_json(), ensure_ascii=False))
        return

    def on_verdicts(verdicts) -> None:
        v = verdicts[0]
        print(v.line() if v else "risk: not checked (--safety off); hint: none", flush=True)

    vlm.answer(request, on_verdicts=on_verdicts, on_text=lambda row, text: print(text, end="", flush=True), **kw)
    print(flush=True)


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring); `argv`: the flags (default: sys.argv)."""
    cli.run(run, FLAGS, argv)


if __name__ == "__main__":
    main()
