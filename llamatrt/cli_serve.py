"""`llamatrt serve` and `llamatrt bench-serve`: thin wrappers over llamatrt.server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from llamatrt.base.errors import InputError
from llamatrt.base.progress import StepBar
from llamatrt.cli_options import backend_option, prefix_cache_option, verify_option


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@backend_option()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 to serve others).")
@click.option("--port", type=int, default=8000, show_default=True, help="Port (0: any free one).")
@click.option(
    "--api-key",
    default=None,
    envvar="LLAMATRT_API_KEY",
    show_envvar=True,
    help="Require `Authorization: Bearer KEY` (all routes but /health); visible in `ps`: prefer the file "
    "or the environment variable.",
)
@click.option("--api-key-file", type=click.Path(path_type=Path), default=None, help="Read the API key from a file.")
@click.option("--open-metrics", is_flag=True, help="Serve /metrics without the API key.")
@click.option("--no-access-log", is_flag=True, help="No access log line per request.")
@click.option(
    "--shutdown-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds in-flight responses get to finish after SIGTERM or Ctrl-C.",
)
@click.option(
    "--max-queue", type=int, default=64, show_default=True, help="Requests that may wait for a row; more get 429."
)
@click.option("--model-name", default=None, help="The model id clients send (default: the artifact folder's name).")
@click.option("--ray", "use_ray", is_flag=True, help="Serve replicas on Ray Serve (pip install 'llamatrt[ray]').")
@click.option("--replicas", type=int, default=2, show_default=True, help="With --ray: replicas, each with an engine.")
@click.option("--ray-address", default=None, help="With --ray: an existing Ray cluster (default: start a local one).")
@prefix_cache_option
@verify_option
def serve(
    artifact: Path,
    backend: str,
    host: str,
    port: int,
    api_key: str | None,
    api_key_file: Path | None,
    open_metrics: bool,
    no_access_log: bool,
    shutdown_timeout: float,
    max_queue: int,
    model_name: str | None,
    use_ray: bool,
    replicas: int,
    ray_address: str | None,
    prefix_cache_mb: int,
    no_verify: bool,
) -> None:
    """An OpenAI-compatible HTTP server over the in-flight batcher (/v1/chat/completions,
    /v1/completions, /v1/models, /health, /metrics)."""
    from llamatrt.server.engine import EngineConfig
    from llamatrt.server.run import serve as run_server
    from llamatrt.server.run import serve_ray

    if max_queue < 1 or not 0 <= port < 65536 or replicas < 1:
        raise InputError("--max-queue and --replicas must be >= 1 and --port in [0, 65535]; fix the one that is not")
    if api_key_file is not None:
        try:
            api_key = api_key_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(
                f"--api-key-file {api_key_file} cannot be read ({e.__class__.__name__}); give a text file "
                "holding the key"
            ) from e
    if api_key is not None and not api_key:
        raise InputError("the API key is empty; give a non-empty key")
    if not shutdown_timeout >= 0:
        raise InputError("--shutdown-timeout must be >= 0 seconds")
    config = EngineConfig(artifact, backend, model_name, max_queue, not no_verify, prefix_cache_mb)
    if use_ray:
        try:
            import ray.serve  # noqa: F401
        except ImportError as e:
            raise InputError("--ray needs Ray Serve; pip install 'llamatrt[ray]'") from e
        serve_ray(config, replicas, host, port, api_key, ray_address)
    else:
        run_server(config, host, port, api_key, open_metrics, not no_access_log, shutdown_timeout)


@click.command(name="bench-serve")
@click.argument("url")
@click.option("--model", default=None, help="Model id to request (default: the server's first).")
@click.option("--api-key", default=None, help="Sent as `Authorization: Bearer KEY`.")
@click.option("--requests", type=int, default=32, show_default=True, help="Requests of the mixed workload.")
@click.option("--clients", type=int, default=8, show_default=True, help="Concurrent streaming clients.")
@click.option("--rate", type=float, default=None, help="Arrivals per second (default: all at once).")
@click.option(
    "--workload",
    type=click.Choice(["mixed", "shared-prefix", "chat"]),
    default="mixed",
    show_default=True,
    help="mixed lengths; one ~600-token system prompt shared by every request; or one chat of --turns turns per client.",
)
@click.option("--turns", type=int, default=6, show_default=True, help="With --workload chat: turns per conversation.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench_serve(url: str, as_json: bool, **options: Any) -> None:
    """Load-test any OpenAI-compatible server at URL: requests/s, output tokens/s, TTFT and
    inter-token latency p50/p99, prompt tokens taken from its cache, errors."""
    from llamatrt.tools.bench_serve import bench_serve as run

    requests, clients, turns, rate = (options[k] for k in ("requests", "clients", "turns", "rate"))
    if requests < 1 or clients < 1 or turns < 1 or (rate is not None and rate <= 0):
        raise InputError("--requests, --clients and --turns must be >= 1 and --rate > 0; fix the one that is not")
    with StepBar(clients * turns if options["workload"] == "chat" else requests, "bench-serve") as bar:
        report = run(url, progress=bar, **options)
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else str(report))
