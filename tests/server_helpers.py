"""A real `llamatrt serve` for tests: a subprocess on a free port (or the fault-injecting server,
tests.fault_server, in one)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai

from tests.safety_helpers import LLAMATRT

PROMPT = "w5 w17 w42 w8"


class Server:
    def __init__(self, artifact: Path, *args: str, command: list[str] | None = None) -> None:
        command = command or [str(LLAMATRT), "serve", str(artifact), "--port", "0", "--no-verify", *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # one log
        self.lines: list[str] = []
        self.url = ""
        deadline = time.monotonic() + 120
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"the server exited: {''.join(self.lines)}")
            self.lines.append(line)
            found = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            if found:
                self.url = found.group(1)
                break
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def client(self, **kw: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)  # type: ignore[arg-type]

    def metric(self, name: str, headers: dict[str, str] | None = None) -> float:
        return metric_of(self.url, name, headers)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def metric_of(url: str, name: str, headers: dict[str, str] | None = None) -> float:
    text = httpx.get(url + "/metrics", headers=headers).text
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def fault_server(artifact: Path) -> Server:
    """The server with a fault-injecting backend (tests.fault_server) in its own process."""
    return Server(artifact, command=[sys.executable, "-m", "tests.fault_server", str(artifact)])
