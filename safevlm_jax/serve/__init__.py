"""An OpenAI-compatible HTTP server over the continuous-batching `Engine`.

    python -m safevlm_jax.serve --checkpoint CKPT          # see __main__.py for the flags

`app.create_app(engine, settings)` builds the FastAPI app: `/v1/chat/completions`
(with the safety verdict in every answer), `/v1/moderations` (the safety head alone),
`/v1/models` and `/v1/models/{id}`, `/health`, `/metrics` (Prometheus) and `/` (the web demo in `static/`).
"""
