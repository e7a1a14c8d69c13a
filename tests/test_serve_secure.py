"""Secure by default: a deployment whose HTTP proxy listens beyond loopback refuses to start without an
API key, with one line saying why and what to do (so serve/config.gpu.yaml can never expose an open
endpoint). Serve is started here bound to 0.0.0.0; no request is sent."""

from __future__ import annotations

import pytest

from ray_zephyr.serving.settings import ServeSettings


def test_a_deployment_open_to_the_network_refuses_to_start_without_an_api_key(ray_session, embedded_model_dir):
    from ray import serve

    from ray_zephyr.runtime import free_ports
    from ray_zephyr.serving.app import build_app

    serve.start(http_options={"host": "0.0.0.0", "port": free_ports()[0]})
    try:
        with pytest.raises(RuntimeError, match="Deploying application open failed"):
            serve.run(build_app(ServeSettings(model=str(embedded_model_dir), engine="transformers", num_gpus=0,
                                              num_cpus=0.5)), name="open", route_prefix="/")
        why = serve.status().applications["open"].deployments["ChatDeployment"].message  # what `serve status` shows
        assert "UserError: refusing to serve on 0.0.0.0 (http_options.host) without an API key: set api_key or " \
               "$RAY_ZEPHYR_API_KEY, or bind to 127.0.0.1" in why
    finally:
        serve.shutdown()
