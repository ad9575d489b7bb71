"""Running the server: one process with uvicorn, or replicas behind Ray Serve.

uvicorn handles SIGTERM itself: it stops accepting connections, lets the in-flight responses
(streams included) finish, runs the app's shutdown (the engine's thread stops), and exits 0.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
from typing import Any

from llamatrt.server.engine import EngineConfig


def serve(
    config: EngineConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    open_metrics: bool = False,
    access_log: bool = True,
    shutdown_timeout: float = 30.0,
) -> None:
    import uvicorn

    from llamatrt.server.app import create_app

    app = create_app(config, api_key, open_metrics=open_metrics)
    name = app.state.engine.model_name

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                bound = self.servers[0].sockets[0].getsockname()[1] if self.servers else port
                print(
                    f"llamatrt serve: {name} at http://{host}:{bound}/v1 (OpenAI API; /health, /metrics)",
                    file=sys.stderr,
                    flush=True,
                )

    # uvicorn shuts down gracefully on SIGTERM and Ctrl-C (in-flight responses get `shutdown_timeout`
    # seconds), then re-raises the signal under the handler that was there before it started; a
    # graceful stop on request is a success, so those handlers do nothing.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    uvicorn_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info" if access_log else "warning",
        access_log=access_log,
        timeout_graceful_shutdown=math.ceil(shutdown_timeout),
    )
    Server(uvicorn_config).run()
    print("llamatrt serve: stopped", file=sys.stderr, flush=True)


def ray_application(config: EngineConfig, replicas: int, api_key: str | None = None) -> Any:
    """A Ray Serve application whose `replicas` each load the artifact and serve the same routes
    (Ray Serve routes requests among them; no balancer of ours)."""
    from ray import serve

    from llamatrt.server.app import create_app

    def build() -> Any:  # runs on each replica
        return create_app(config, api_key)

    deployment = serve.deployment(name="llamatrt", num_replicas=replicas)(serve.ingress(build)())
    return deployment.bind()


def serve_ray(
    config: EngineConfig, replicas: int, host: str, port: int, api_key: str | None, address: str | None = None
) -> None:
    """Run the Ray Serve application on a Ray cluster (`address`, or a local one) until interrupted."""
    import ray
    from ray import serve

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(ray_application(config, replicas, api_key), route_prefix="/")
    print(f"llamatrt serve: {replicas} replicas on Ray Serve at http://{host}:{port}/v1", file=sys.stderr, flush=True)
    import threading

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with contextlib.suppress(KeyboardInterrupt):
        done.wait()
    serve.shutdown()
