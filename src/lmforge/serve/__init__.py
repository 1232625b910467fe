"""The OpenAI-compatible server: `create_app` (app.py) over the continuous-batching engine, `lmforge serve` (cli.py).
See docs/serving.md."""
