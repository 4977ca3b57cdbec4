"""Evaluation and visualisation of SafeVLM checkpoints (the paper's Figs. 4-5, RTVLM runs).

  head      safety-head accuracy, per-class P/R/F1, confusion matrices (guard program)
  tsne      t-SNE of pooled CLIP vs safety-projector features, silhouette scores
  generate  batch answers to RTVLM-style questions, refusal rates with safety on vs off
  report    one Markdown + HTML report of the runs, with the paper's numbers as reference

`metrics`, `refusal`, `dataset` and `plots` are the numpy / matplotlib pieces they share.
"""
