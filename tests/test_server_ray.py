"""The server's Ray Serve application on a local Ray instance: two replicas, each with its own
engine, both answering through Ray Serve's proxy (no balancer of ours)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] not installed (pip install 'llamatrt[ray]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_two_replicas_on_ray_serve_both_answer(tiny_artifact: Path) -> None:
    import openai
    import ray
    from ray import serve

    from llamatrt.server.engine import EngineConfig
    from llamatrt.server.run import ray_application

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            ray_application(EngineConfig(tiny_artifact, model_name="tiny", verify=False), replicas=2), route_prefix="/"
        )
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=2)
        seen, texts = set(), set()
        for _ in range(40):
            answer = client.completions.create(model="tiny", prompt="w5 w17 w42", max_tokens=4, temperature=0)
            seen.add(answer.system_fingerprint)
            texts.add(answer.choices[0].text)
            if len(seen) == 2:
                break
        assert len(seen) == 2, seen  # both replicas answered
        assert len(texts) == 1  # with the same tokens
    finally:
        serve.shutdown()
        ray.shutdown()
