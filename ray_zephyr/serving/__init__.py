"""Chat serving: an OpenAI-compatible chat endpoint over a trained Hugging Face folder.

One Ray Serve deployment (`serve/app.py`) holds an engine (vLLM on GPU, transformers on CPU) and the
HTTP routes; everything that speaks OpenAI lives here, shared by both engines:
`settings` (what the Serve config/flags set), `protocol` (request validation, error bodies),
`service` (chat template -> engine -> OpenAI responses), `api` (FastAPI routes, auth, SSE).
"""
