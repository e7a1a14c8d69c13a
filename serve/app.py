"""What `serve run serve.app:build_app` and the Serve configs' `import_path: serve.app:build_app` import: the
application itself is `ray_zephyr.serving.app`, re-exported here so that import path stays short and stable."""

from ray_zephyr.serving.app import build_app

__all__ = ["build_app"]
