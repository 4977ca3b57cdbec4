"""SafeVLM data: JSON records -> TFDS array_record dataset -> grain batches.

records (validation) · images (paths, decoding, CLIP preprocessing) · template (LLaVA v1
text and labels) · tokenizer (tiny in-process tokenizer) · builder/build (TFDS dataset and
CLI) · pipeline (grain input pipeline, global batches) · synthetic (procedural data set).
"""
