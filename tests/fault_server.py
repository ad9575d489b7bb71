"""`python -m tests.fault_server ARTIFACT`: `llamatrt serve`'s application with a fault-injecting
backend, in a process of its own (so a test can measure its memory and descriptors). A prompt
holding w97 fails its prefill; one holding w96 breaks the loop itself."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

FAILS_ITS_PREFILL = 97  # token id of "w97" in the tiny tokenizer
BREAKS_THE_LOOP = 96


class LoopBreaker(BaseException):
    """Not an Exception: what no request-level handler may swallow (a bug in the loop itself)."""


def inject_faults(scheduler: Any) -> None:
    """Wraps where the scheduler takes a prompt's next window into a call (its own prefill call, or
    a packed call beside the decode rows; a decode of one row feeds a [1, 1] batch like a one-token
    prefill, so the backend alone cannot tell which tokens are the prompt's)."""
    take = scheduler._take_window

    def faulty(row: Any, call: Any) -> Any:
        prompt = row.request.prompt
        if FAILS_ITS_PREFILL in prompt:
            raise RuntimeError("injected fault")
        if BREAKS_THE_LOOP in prompt:
            raise LoopBreaker("injected loop failure")
        return take(row, call)

    scheduler._take_window = faulty


def main(artifact: str) -> None:
    import uvicorn

    from llamatrt.server.app import create_app
    from llamatrt.server.engine import EngineConfig

    app = create_app(EngineConfig(Path(artifact), verify=False, model_name="tiny"))
    inject_faults(app.state.engine.scheduler)

    class Announcing(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            port = self.servers[0].sockets[0].getsockname()[1]
            print(f"fault server at http://127.0.0.1:{port}/v1", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, lambda *_: None)  # as `llamatrt serve`: a graceful stop exits 0
    Announcing(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")).run()


if __name__ == "__main__":
    main(sys.argv[1])
