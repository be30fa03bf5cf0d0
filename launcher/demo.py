"""`sidecar demo`: the sidecar at work with no API key and no network.

Starts the project's mock API (with a real model's pacing) on 127.0.0.1, then
runs the example agent through `sidecar run` twice with a fresh state
directory: the first run reaches the API, the second is served from the cache.
"""

from __future__ import annotations

import asyncio
import queue
import signal
import sys
import tempfile
import threading
import time

from agent_sidecar.proxy.config import Config

from .supervise import WATCHED, run_agent


def start_mock() -> tuple[object, str]:
    """The mock API on its own thread and loop; returns (mock, url)."""
    from agent_sidecar.bench.mock_upstream import MockUpstream, Profile
    mock = MockUpstream(Profile(ttft=0.4, tokens_per_second=60, output_tokens=24))
    ready: queue.Queue = queue.Queue()

    def serve() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)  # the launcher waits for these in the main thread
        loop = asyncio.new_event_loop()
        loop.run_until_complete(mock.start())
        ready.put(mock.url)
        loop.run_forever()

    threading.Thread(target=serve, name="mock-api", daemon=True).start()
    return mock, ready.get(timeout=10)


def run_demo(config: Config) -> int:
    try:
        import anthropic  # noqa: F401
        import openai  # noqa: F401
    except ImportError:
        print("sidecar: the demo's agent uses the official SDKs: pip install 'agent-sidecar[demo]'", file=sys.stderr)
        return 2
    mock, url = start_mock()
    agent = [sys.executable, "-m", "agent_sidecar.launcher.demo_agent"]
    with tempfile.TemporaryDirectory(prefix="sidecar-demo-") as state:
        config = config.replace("upstream", anthropic=url, openai=url + "/v1").replace("state", dir=state)
        print(f"sidecar demo: mock API on {url} (0.4 s to first token, 60 tokens/s); agent: {' '.join(agent)}")
        for run in (1, 2):
            before = mock.count()
            print(f"\nrun {run}: sidecar run -- python -m agent_sidecar.launcher.demo_agent")
            start = time.perf_counter()
            status = run_agent(agent, config.replace("proxy", agent_id=f"demo-run-{run}"))
            elapsed = time.perf_counter() - start
            if status != 0:
                print(f"sidecar: the demo agent failed with status {status}", file=sys.stderr)
                return status
            reached = mock.count() - before
            print(f"  -> {elapsed:.2f}s, {reached} call(s) reached the API"
                  + (" (every answer came from the sidecar's cache)" if reached == 0 else ""))
    print("\nWith a real key: sidecar run -- claude   (or any agent command)")
    return 0
