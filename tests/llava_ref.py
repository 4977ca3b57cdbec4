"""LLaVA-1.5's own text code, written out for parity tests (haotian-liu/LLaVA, main branch):
`conv_vicuna_v1` (llava/conversation.py), `tokenizer_image_token` (llava/mm_utils.py),
`preprocess_multimodal` and `preprocess_v1` (llava/train/train.py), in their straightforward
form, plus the PSA-VLM authors' inference strings (models/condition.py, docs/prompt_formats.md)."""

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id for <image> in tokenizer_image_token's output
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
PSA_PROMPT = "<image>\n USER: {question} \nASSISTANT:"
PSA_HINTED_PROMPT = "<image>\n \n USER: {question}  \n Safe Hint: {hint} \n ASSISTANT:  "


def tokenizer_image_token(prompt, tokenizer):
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    input_ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    separated = [x for pair in zip(chunks, [[IMAGE_TOKEN_INDEX] * (offset + 1)] * len(chunks)) for x in pair][:-1]
    for x in separated:
        input_ids.extend(x[offset:])
    return input_ids


def vicuna_v1_prompt(rounds, answered=True):
    """conv_vicuna_v1.get_prompt() (SeparatorStyle.TWO) after preprocess_multimodal, which puts
    "<image>\\n" in front of the stripped first question. rounds: [(question, answer)];
    answered=False: the last answer is None (a generation prompt ending with "ASSISTANT:")."""
    sep, sep2 = " ", "</s>"
    prompt = VICUNA_V1_SYSTEM + sep
    for i, (q, a) in enumerate(rounds):
        q = "<image>\n" + q.replace("<image>", "").strip() if i == 0 else q
        prompt += "USER: " + q + sep
        last = not answered and i == len(rounds) - 1
        prompt += "ASSISTANT:" if last else "ASSISTANT: " + a + sep2
    return prompt


def preprocess_v1(rounds, tokenizer):
    """-> (input_ids, labels) with IMAGE_TOKEN_INDEX for the image, as preprocess_v1 gives them
    (has_image=True). `tokenizer.legacy` decides LLaVA's off-by-one fix for tokenizers that
    put no word-start marker after `</s>`; tokenizers without the attribute count as legacy
    (their text after `</s>` tokenizes as on its own)."""
    prompt = vicuna_v1_prompt(rounds)
    input_ids = tokenizer_image_token(prompt, tokenizer)
    target = list(input_ids)
    sep = " " + "ASSISTANT" + ": "
    total_len = len(input_ids)  # no padding here
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX]
    for i, rou in enumerate(prompt.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer_image_token(rou, tokenizer))
        instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 2
        if i != 0 and not getattr(tokenizer, "legacy", True):
            round_len -= 1
            instruction_len -= 1
        target[cur_len:cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * (len(target) - cur_len)
    if cur_len != total_len:  # LLaVA masks the whole example ("tokenization mismatch")
        target = [IGNORE_INDEX] * len(target)
    return input_ids, target


def expand_image(ids, labels, image_id, n):
    """LLaVA's single IMAGE_TOKEN_INDEX -> n image positions (ignored in the labels)."""
    out_ids, out_labels = [], []
    for i, l in zip(ids, labels):
        out_ids += [image_id] * n if i == IMAGE_TOKEN_INDEX else [i]
        out_labels += [IGNORE_INDEX] * n if i == IMAGE_TOKEN_INDEX else [l]
    return out_ids, out_labels
