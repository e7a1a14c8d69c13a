"""The Ray Serve application: one autoscaling deployment holding the engine and the HTTP routes.

Serve configs and `serve run` name it by the shim `serve/app.py` (import path `serve.app:build_app`):

    serve run serve/config.yaml                                  # local CPU, 127.0.0.1:8000
    serve run serve.app:build_app model=/path/to/folder engine=transformers num_gpus=0
    serve deploy serve/config.gpu.yaml                           # a cluster, vLLM on GPUs

From Python: `serve.run(build_app(ServeSettings(model=..., engine="transformers", num_gpus=0)))`.
The arguments are `ray_zephyr.serving.settings.ServeSettings`; Serve validates them before building.
"""

# No `from __future__ import annotations` here: Serve reads build_app's annotation at runtime to turn
# the config's `args` (or `serve run` key=value flags) into ServeSettings.
import ipaddress
import os

import ray
from ray import serve
from ray.serve import Application
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

from ray_zephyr.errors import UserError
from ray_zephyr.models import check_model_source
from ray_zephyr.serving.api import build_api
from ray_zephyr.serving.engines import load_engine
from ray_zephyr.serving.metrics import ServingMetrics
from ray_zephyr.serving.service import ChatService
from ray_zephyr.serving.settings import API_KEY_ENV, ServeSettings


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: reachable from elsewhere as far as we can tell
        return False


@serve.deployment
@serve.ingress()
class ChatDeployment:
    """One replica: an engine on this replica's devices and the OpenAI routes in front of it."""

    async def __init__(self, settings: ServeSettings):
        # The key may come from the replica's environment so it need not appear in the Serve config.
        self.api_key = settings.api_key or os.environ.get(API_KEY_ENV)
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        host = (await controller.get_http_config.remote()).host
        if not self.api_key and not _is_loopback(host):
            raise UserError(f"refusing to serve on {host} (http_options.host) without an API key: set api_key or "
                            f"${API_KEY_ENV}, or bind to 127.0.0.1")
        self.settings = settings
        self.engine = load_engine(settings)
        self.service = ChatService(self.engine, settings.served_name(), settings.max_n, settings.default_max_tokens,
                                   ServingMetrics(settings.served_name()))

    def __serve_build_asgi_app__(self):
        return build_api(self.service, self.api_key, self.settings.max_request_bytes)

    async def check_health(self) -> None:
        await self.engine.check_health()


def build_app(settings: ServeSettings) -> Application:
    """Serve's application builder: `settings` come from the config file's `args` or `serve run` flags. A model that
    does not exist is one line here, before any replica starts (each would fail with the traceback, and retry)."""
    check_model_source(settings.model, "model")
    return ChatDeployment.options(**settings.deployment_options()).bind(settings)
