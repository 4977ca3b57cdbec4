"""The PSA-VLM authors' inference prompt strings, as data: `models/condition.py` of their
release (Yingshui-Tan/PSA-VLM; docs/prompt_formats.md, "psa"), spaces and newlines exactly.
Their code tokenizes them with LLaVA's `tokenizer_image_token` (tests/llava_upstream.py)."""

PSA_PROMPT = "<image>\n USER: {question} \nASSISTANT:"
PSA_HINTED_PROMPT = "<image>\n \n USER: {question}  \n Safe Hint: {hint} \n ASSISTANT:  "
