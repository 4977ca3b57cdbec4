"""Generation: one path for sampling and serving (docs/architecture.md draws it).

device side: `state` (the DecodeState pytree), `sampling` (the per-row sampler), `programs`
(the jitted verdict / prefill / insert / step / generate programs), `runner` (a model's
parameters on a mesh, its decode state, the programs at bucketed shapes);
host side: `requests` (requests, sampling parameters, typed events, handles), `scheduler`
(queue, admission, rows, chunks, stop conditions), `caches` (prefix and verdict reuse),
`stats`, `detokenize`, `buckets`, `errors`;
both: `executor` (a scheduler plan run on a runner), `engine` (continuous batching: the thread
and both sides), `pipeline` (`SafeVLMInference`: a batch of image + question -> verdict + answer).
"""
