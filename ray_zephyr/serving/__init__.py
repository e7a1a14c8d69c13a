"""Chat serving: an OpenAI-compatible chat endpoint over a trained Hugging Face folder.

One Ray Serve deployment (`app`, which `serve/app.py` re-exports for Serve's import path) holds an engine
(vLLM on GPU, transformers on CPU) and the HTTP routes. Shared by both engines: `settings` (what the Serve
config/flags set), `protocol` (request validation, error bodies), `engine` (the interface an engine
implements), `engines` (which engine the settings ask for), `service` (chat template -> engine -> OpenAI
responses), `api` (FastAPI routes, auth, SSE). The engines: `vllm_engine`, and `transformers_engine` with its
batch (`batch`, `sampling`) and per-request state (`decoding`).
"""
