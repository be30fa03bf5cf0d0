"""The processes a benchmark runs: the mock API, sidecars, the bare proxy, redis-server, the load worker.

Each is its own OS process on 127.0.0.1 with a log file in the run's temp
directory. All are registered in one `Procs` and stopped at the end, on errors
and on Ctrl-C (SIGTERM, then SIGKILL); on Linux they also get SIGTERM if the
bench itself dies (PR_SET_PDEATHSIG), so nothing outlives a run.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import psutil

ROOT = Path(__file__).resolve().parent.parent
_READY = re.compile(rb"(http://127\.0\.0\.1:\d+)")
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never through an HTTP proxy


class BenchError(Exception):
    """A server crashed, did not start, or a job failed: the scenario reports it instead of numbers."""


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def clean_env(**extra: str) -> dict[str, str]:
    """The bench's environment without proxies, API keys, base URLs or sidecar settings, plus `extra`."""
    drop = ("ANTHROPIC_", "OPENAI_", "SIDECAR_")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(drop) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(NO_PROXY="127.0.0.1,localhost", PYTHONPATH=str(ROOT), **extra)
    return env


def http(method: str, url: str, body: dict | None = None, timeout: float = 5.0) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with _opener.open(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(ps: psutil.Process) -> float:
    """A process's CPU time so far: the kernel's nanosecond run times of its threads where Linux has them
    (/proc/PID/task/*/schedstat), else user + system in clock ticks (10 ms steps)."""
    try:
        total = 0
        for task in os.scandir(f"/proc/{ps.pid}/task"):
            with open(f"{task.path}/schedstat", "rb") as fh:
                total += int(fh.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        times = ps.cpu_times()
        return times.user + times.system


def with_cpu(proc: "Proc", run: Callable[[], dict]) -> dict:
    """run()'s result with `proc_cpu_us`: that process's own CPU time per answered call, steadier than a
    rate on a shared machine (the load generator and the mock are not in it)."""
    before = cpu_seconds(proc.ps)
    result = run()
    used = max(0.0, cpu_seconds(proc.ps) - before)
    result["proc_cpu_us"] = used / max(result.get("ok", 0), 1) * 1e6
    return result


class Proc:
    """One child process whose stderr goes to a log file; `url` once it said where it listens."""

    def __init__(self, name: str, cmd: list[str], env: dict, logdir: Path, stdin=subprocess.DEVNULL, stdout=None,
                 stdout_to_log: bool = False, cwd: Path = ROOT):
        self.name = name
        self.log = logdir / f"{name}.log"
        self._log_fh = open(self.log, "wb")
        stdout = self._log_fh if stdout_to_log else stdout or subprocess.DEVNULL
        self.popen = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=stdin, stdout=stdout,
                                      stderr=self._log_fh, start_new_session=True, preexec_fn=_die_with_parent)
        self.ps = psutil.Process(self.popen.pid)
        self.url = ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 6) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def check(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.name} exited with status {self.popen.returncode}: {self.tail()}")

    def wait_url(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = _READY.search(self.log.read_bytes())
            if found:
                self.url = found.group(1).decode()
                return self.url
            self.check()
            time.sleep(0.02)
        raise BenchError(f"{self.name} did not start within {timeout:g} s: {self.tail()}")

    def stop(self, grace: float = 5.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log_fh.close()


class LoadWorker(Proc):
    """`python -m bench.load --serve`: send a job, get its JSON result."""

    def __init__(self, logdir: Path, name: str = "load"):
        super().__init__(name, [sys.executable, "-m", "agent_sidecar.bench.load", "--serve"], clean_env(), logdir,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def run(self, job: dict, timeout: float = 300.0) -> dict:
        self.check()
        self.popen.stdin.write(json.dumps(job).encode() + b"\n")
        self.popen.stdin.flush()
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.stop(grace=1)
            raise BenchError(f"load job {job.get('kind')} took over {timeout:g} s") from None
        if line is None:
            raise BenchError(f"load worker exited: {self.tail()}")
        result = json.loads(line)
        if "fatal" in result:
            raise BenchError(f"load job failed: {result['fatal']}")
        return result

    def stop(self, grace: float = 5.0) -> None:
        if self.alive():
            try:
                self.popen.stdin.close()   # it exits at end of input
                self.popen.wait(grace)
            except (OSError, subprocess.TimeoutExpired):
                pass
        super().stop(grace=1)


class Sampler:
    """Peak RSS of a process, and peak anonymous memory (RSS minus file-backed and shared pages, i.e.
    RssAnon: psutil's `shared` is RssFile + RssShmem), sampled on a thread every `every` seconds."""

    def __init__(self, ps: psutil.Process, every: float = 0.02):
        self.ps, self.every, self.peak, self.peak_anon = ps, every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                mem = self.ps.memory_info()
                self.peak = max(self.peak, mem.rss)
                self.peak_anon = max(self.peak_anon, mem.rss - getattr(mem, "shared", 0))
            except psutil.Error:
                return
            self._stop.wait(self.every)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def checkout(tree: Path, shim: Path) -> tuple[str, Path]:
    """How to start the sidecar of another checkout of this repository: (its launcher module, the directory
    to run it in, which is also its PYTHONPATH). Run from `shim`, where only that tree's packages are found, as
    its layout names them: `agent_sidecar.*` (today's), or the top-level `proxy`/`launcher` of older trees."""
    tree = tree.resolve()
    if not (tree / "launcher" / "cli.py").is_file() or not (tree / "proxy").is_dir():
        raise BenchError(f"--sidecar-from {tree}: not a checkout of this repository (no launcher/cli.py, proxy/)")
    project = tree / "pyproject.toml"
    packaged = project.is_file() and "agent_sidecar.launcher" in project.read_text(errors="replace")
    home = shim / "agent_sidecar" if packaged else shim
    home.mkdir(parents=True)
    for package in ("proxy", "launcher", "bench"):
        if (tree / package).is_dir():
            (home / package).symlink_to(tree / package)
    return ("agent_sidecar.launcher" if packaged else "launcher"), shim


class Procs:
    """Every process of a run, stopped together; a temp dir for logs and state."""

    def __init__(self, keep: bool = False, sidecar_from: Path | None = None):
        self.tmp = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
        self.keep = keep
        self.all: list[Proc] = []
        self._n = 0
        # Sidecars from another checkout (`--sidecar-from`): (module to run, directory to run it in).
        try:
            self._tree = checkout(sidecar_from, self.tmp / "sidecar-from") if sidecar_from is not None else None
        except BenchError:
            self.close()
            raise

    def _name(self, base: str) -> str:
        self._n += 1
        return f"{self._n:02d}-{base}"

    def mock(self, ttft: float = 0.0, tps: float = 0.0, output_tokens: int = 12, max_concurrency: int = 0,
             retry_after: float = 1.0, **flags: float) -> Proc:
        """The mock API; `flags` such as wall_latency=0.05 become its --wall-latency 0.05 options."""
        cmd = [sys.executable, "-m", "agent_sidecar.bench.mock_upstream", "--host", "127.0.0.1", "--port", "0",
               "--ttft", str(ttft), "--tps", str(tps), "--output-tokens", str(output_tokens),
               "--max-concurrency", str(max_concurrency), "--retry-after", str(retry_after),
               *(x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v)))]
        proc = Proc(self._name("mock"), cmd, clean_env(), self.tmp)
        self.all.append(proc)
        return proc

    def bare(self, upstream: str) -> Proc:
        """`python -m bench.bare_proxy`: the yardstick, a bare aiohttp+uvloop reverse proxy to `upstream`."""
        cmd = [sys.executable, "-m", "agent_sidecar.bench.bare_proxy", "--upstream", upstream, "--host", "127.0.0.1", "--port", "0"]
        proc = Proc(self._name("bare"), cmd, clean_env(), self.tmp)
        self.all.append(proc)
        return proc

    def bare_cache(self, upstream: str) -> Proc:
        """`python -m bench.bare_cache`: the hits' yardstick, the bare proxy with an exact-match LMDB cache."""
        name = self._name("barecache")
        cmd = [sys.executable, "-m", "agent_sidecar.bench.bare_cache", "--upstream", upstream,
               "--dir", str(self.tmp / f"{name}-lmdb"), "--host", "127.0.0.1", "--port", "0"]
        proc = Proc(name, cmd, clean_env(), self.tmp)
        self.all.append(proc)
        return proc

    def sidecar(self, upstream: str, state: Path | None = None, **settings: str) -> Proc:
        """`python -m agent_sidecar.launcher serve --port 0`; `settings` like cache_mode="off" become SIDECAR_CACHE_MODE."""
        name = self._name("sidecar")
        state = state or self.tmp / f"{name}-state"
        env = clean_env(ANTHROPIC_BASE_URL=upstream, OPENAI_BASE_URL=upstream + "/v1", SIDECAR_STATE_DIR=str(state),
                        **{f"SIDECAR_{k.upper()}": str(v) for k, v in settings.items()})
        module, cwd = self._tree or ("agent_sidecar.launcher", ROOT)
        env["PYTHONPATH"] = str(cwd)   # ROOT already, unless the sidecars come from another checkout
        proc = Proc(name, [sys.executable, "-m", module, "serve", "--port", "0"], env, self.tmp, cwd=cwd)
        proc.state = state
        self.all.append(proc)
        return proc

    def redis(self, server: str) -> Proc:
        """`redis-server` on a free 127.0.0.1 port, nothing saved to disk; `url` is its redis:// URL once ready."""
        port = free_port()
        cmd = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(self.tmp), "--daemonize", "no"]
        proc = Proc(self._name("redis"), cmd, clean_env(), self.tmp, stdout_to_log=True)
        self.all.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        proc.url = f"redis://127.0.0.1:{port}/0"
                        return proc
            except OSError:
                pass
            proc.check()
            time.sleep(0.05)
        raise BenchError(f"{proc.name} does not answer PING on port {port}: {proc.tail()}")

    def load(self) -> LoadWorker:
        proc = LoadWorker(self.tmp, self._name("load"))
        self.all.append(proc)
        return proc

    def ready(self, *procs: Proc) -> None:
        """Wait until each (started in parallel) listens and answers."""
        for proc in procs:
            url = proc.wait_url()
            probe = "/_sidecar/health" if "sidecar" in proc.name else "/_mock/stats"
            for _ in range(100):
                try:
                    http("GET", url + probe)
                    break
                except OSError:
                    proc.check()
                    time.sleep(0.05)
            else:
                raise BenchError(f"{proc.name} does not answer on {url}: {proc.tail()}")

    def stop(self, *procs: Proc) -> None:
        for proc in procs or list(self.all):
            proc.stop()
            if proc in self.all:
                self.all.remove(proc)

    def close(self) -> None:
        self.stop()
        if not self.keep:
            import shutil
            shutil.rmtree(self.tmp, ignore_errors=True)
