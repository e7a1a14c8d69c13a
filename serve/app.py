"""The Ray Serve application: one autoscaling deployment holding the engine and the HTTP routes.

    serve run serve/config.yaml                                  # local CPU, 127.0.0.1:8000
    serve run serve.app:build_app model=/path/to/folder engine=transformers num_gpus=0
    serve deploy serve/config.gpu.yaml                           # a cluster, vLLM on GPUs

From Python: `serve.run(build_app(ServeSettings(model=..., engine="transformers", num_gpus=0)))`.
The arguments are `ray_zephyr.serving.settings.ServeSettings`; Serve validates them before building.
"""

# No `from __future__ import annotations` here: Serve reads build_app's annotation at runtime to turn
# the config's `args` (or `serve run` key=value flags) into ServeSettings.
import os

from ray import serve
from ray.serve import Application

from ray_zephyr.serving.api import build_api
from ray_zephyr.serving.engine import load_engine
from ray_zephyr.serving.service import ChatService
from ray_zephyr.serving.settings import API_KEY_ENV, ServeSettings


@serve.deployment
@serve.ingress()
class ChatDeployment:
    """One replica: an engine on this replica's devices and the OpenAI routes in front of it."""

    def __init__(self, settings: ServeSettings):
        self.engine = load_engine(settings)
        self.service = ChatService(self.engine, settings.served_name(), settings.max_n)
        # The key may come from the replica's environment so it need not appear in the Serve config.
        self.api_key = settings.api_key or os.environ.get(API_KEY_ENV)

    def __serve_build_asgi_app__(self):
        return build_api(self.service, self.api_key)

    async def check_health(self) -> None:
        await self.engine.check_health()


def build_app(settings: ServeSettings) -> Application:
    """Serve's application builder: `settings` come from the config file's `args` or `serve run` flags."""
    return ChatDeployment.options(**settings.deployment_options()).bind(settings)
