"""One Markdown + HTML report of evaluation runs, with the paper's numbers as reference rows.

    python -m safevlm_jax.eval.report --runs runs/head runs/tsne runs/rtvlm --out runs/report

Each run directory holds the outputs of `eval.head` (head_metrics.json), `eval.tsne`
(tsne.json) and/or `eval.generate` (*_refusal.json), with their PNGs. Writes OUT/report.md,
OUT/report.html and OUT/figures/*.png (copies, so the report can be moved as one folder).
The SafeVLM paper's published numbers (`PAPER_*` below) are added as separate rows and tables whose
labels start with "paper:" — they are quoted, never computed from the runs.
"""

from __future__ import annotations

import glob
import html
import json
import os
import shutil
from typing import Sequence

from absl import flags

from safevlm_jax import cli
from safevlm_jax.eval.refusal import rates_table
from safevlm_jax.eval.tables import html_table, markdown_table

SOURCE = "SafeVLM paper (arXiv 2405.13581)"
PAPER_HEAD_ACCURACY = "≈ 0.92–0.99 per class"
PAPER_RTVLM = (("LLaVA-1.5-7B", "6.39"), ("LLaVA-1.5-13B", "6.55"), ("GPT-4V", "7.92"), ("SafeVLM-7B", "8.18"),
               ("SafeVLM-7B+LoRA", "8.26"), ("SafeVLM-13B", "8.40"), ("SafeVLM-13B+LoRA", "8.46"))
PAPER_OTHER_RISKS = (("LLaVA-1.5-7B", "7.00", "1.19", "5.67"), ("SafeVLM-13B+LoRA", "9.13", "8.72", "7.45"))
PAPER_GENERAL = (("LLaVA-1.5-7B", "64.3", "61.6", "1773.6"), ("SafeVLM-7B", "66.8", "65.3", "1762.7"))


class Doc:
    """Report blocks rendered to both Markdown and HTML; figures are copied into OUT/figures."""

    def __init__(self, out: str):
        self.out, self.md, self.html = out, [], []
        os.makedirs(os.path.join(out, "figures"), exist_ok=True)

    def heading(self, level: int, text: str) -> None:
        self.md.append(f"{'#' * level} {text}")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def text(self, text: str) -> None:
        self.md.append(text)
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: Sequence[str], rows: Sequence[Sequence]) -> None:
        self.md.append(markdown_table(header, rows))
        self.html.append(html_table(header, rows))

    def figure(self, path: str, name: str, caption: str) -> None:
        if not os.path.isfile(path):
            self.text(f"(figure missing: {path})")
            return
        rel = f"figures/{name}"
        shutil.copyfile(path, os.path.join(self.out, rel))
        self.md.append(f"![{caption}]({rel})")
        self.html.append(f'<figure><img src="{rel}" alt="{html.escape(caption)}" style="max-width:100%">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def write(self, title: str) -> tuple[str, str]:
        md, page = os.path.join(self.out, "report.md"), os.path.join(self.out, "report.html")
        with open(md, "w", encoding="utf-8") as f:
            f.write(f"# {title}\n\n" + "\n\n".join(self.md) + "\n")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;"
                 "margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px}")
        with open(page, "w", encoding="utf-8") as f:
            f.write(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>\n"
                    + "\n".join(self.html) + "\n</body></html>\n")
        return md, page


def _load(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def find_runs(dirs: Sequence[str]) -> list[tuple[str, str, dict[str, list[str]]]]:
    """[(run name, directory, {"head"|"tsne"|"refusal": [json paths]})]; a directory without any
    evaluation output is an error."""
    runs, names = [], set()
    for d in dirs:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{d}: no such run directory")
        found = {"head": glob.glob(os.path.join(d, "head_metrics.json")),
                 "tsne": glob.glob(os.path.join(d, "tsne.json")),
                 "refusal": sorted(glob.glob(os.path.join(d, "*_refusal.json")))}
        if not any(found.values()):
            raise ValueError(f"{d}: no evaluation results (head_metrics.json, tsne.json or *_refusal.json)")
        name = os.path.basename(os.path.normpath(d)) or d
        while name in names:
            name += "_"
        names.add(name)
        runs.append((name, d, found))
    return runs


def _head(doc: Doc, runs) -> None:
    heads = [(name, d, _load(p)) for name, d, found in runs for p in found["head"]]
    if not heads:
        return
    doc.heading(2, "Safety head (risk level and risk type)")
    rows = [[name, r["n"], len(r["skipped"]), r["level"]["accuracy"], r["level"]["macro"]["f1"],
             r["type"]["accuracy"], r["type"]["macro"]["f1"]] for name, _, r in heads]
    paper = PAPER_HEAD_ACCURACY
    rows.append(["paper: SafeVLM (arXiv 2405.13581)", "–", "–", paper, "–", paper, "–"])
    doc.table(["run", "images", "skipped", "level accuracy", "level macro F1", "type accuracy", "type macro F1"],
              rows)
    for name, d, r in heads:
        doc.heading(3, f"{name}: per class")
        for key in ("level", "type"):
            doc.table([f"risk {key}", "precision", "recall", "F1", "support"],
                      [[c["name"], c["precision"], c["recall"], c["f1"], c["support"]]
                       for c in r[key]["per_class"]])
            doc.figure(os.path.join(d, f"confusion_{key}.png"), f"{name}-confusion_{key}.png",
                       f"{name}: confusion matrix of risk {key}")


def _tsne(doc: Doc, runs) -> None:
    items = [(name, d, _load(p)) for name, d, found in runs for p in found["tsne"]]
    if not items:
        return
    doc.heading(2, "Feature separation (t-SNE, silhouette scores)")
    doc.text("Silhouette score of the risk labels (−1 to 1, higher = better separated), on the pooled "
             "features and on their 2-D t-SNE embedding.")
    rows = [[name, r["n"], fs, kind, s["features"], s["tsne"]]
            for name, _, r in items for fs, by in r["silhouette"].items() for kind, s in by.items()]
    doc.table(["run", "images", "features", "labels", "silhouette (features)", "silhouette (t-SNE)"], rows)
    for name, d, _ in items:
        doc.figure(os.path.join(d, "tsne.png"), f"{name}-tsne.png", f"{name}: t-SNE by risk level and type")


def _refusal(doc: Doc, runs) -> None:
    items = [(name, p, _load(p)) for name, _, found in runs for p in found["refusal"]]
    if not items:
        return
    doc.heading(2, "Refusal rates (RTVLM-style questions)")
    for name, p, r in items:
        doc.heading(3, f"{name}: {os.path.basename(p)[:-len('_refusal.json')]}")
        doc.text(f"{len(r['patterns'])} refusal patterns; {len(r['skipped'])} questions skipped.")
        doc.table(*rates_table(r))
        doc.figure(p[:-len(".json")] + ".png", f"{name}-{os.path.basename(p)[:-5]}.png",
                   f"{name}: refusal rate per category")


def _paper(doc: Doc) -> None:
    doc.heading(2, "Published results (paper: reference only, not computed by these runs)")
    doc.text(f"Source: {SOURCE}. RTVLM scores are GPT-4-judged safety scores (0–10); the answers "
             "files written by eval.generate are the input such a judge needs.")
    doc.table(["paper: model", "RTVLM average safety score"], [[f"paper: {m}", s] for m, s in PAPER_RTVLM])
    doc.table(["paper: model", "politics", "pornography", "cyberbullying"],
              [[f"paper: {m}", *v] for m, *v in PAPER_OTHER_RISKS])
    doc.table(["paper: model", "MMBench", "SEED", "MME"], [[f"paper: {m}", *v] for m, *v in PAPER_GENERAL])
    doc.table(["paper: model", "safety head accuracy"], [["paper: SafeVLM", PAPER_HEAD_ACCURACY]])


def build_report(run_dirs: Sequence[str], out: str, title: str = "SafeVLM evaluation") -> tuple[str, str]:
    """Writes OUT/report.md and OUT/report.html (and OUT/figures); returns their paths."""
    if not run_dirs:
        raise ValueError("no run directories given")
    runs = find_runs(run_dirs)
    doc = Doc(out)
    doc.text("Runs: " + "; ".join(f"{name} = {os.path.abspath(d)}" for name, d, _ in runs))
    _head(doc, runs)
    _tsne(doc, runs)
    _refusal(doc, runs)
    _paper(doc)
    return doc.write(title)


FLAGS = flags.FlagValues()
flags.DEFINE_list("runs", None, "output directories of eval.head/tsne/generate (comma-separated; more may "
                  "follow as arguments: --runs A B C)", required=True, flag_values=FLAGS)
flags.DEFINE_string("out", None, "report directory", required=True, flag_values=FLAGS)
flags.DEFINE_string("title", "SafeVLM evaluation", "report title", flag_values=FLAGS)


def _main(argv) -> None:
    md, page = build_report(FLAGS.runs + argv[1:], FLAGS.out, FLAGS.title)
    print(f"wrote {md} and {page}")


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (see the module docstring); `argv`: the flags (default: sys.argv)."""
    cli.run(_main, FLAGS, argv, positional=True)


if __name__ == "__main__":
    main()
