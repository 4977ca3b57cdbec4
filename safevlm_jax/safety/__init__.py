"""The safety side of SafeVLM outside the model: the risk taxonomy, the hint texts, the
verdict from the head's logits, the risk policy and the conditional safety prompt."""
