"""`sidecar` at its edges, as real processes: every command and action given bad arguments, missing or
unwritable files, a corrupt state directory, a reader that goes away. Each must end in one line and exit
status 2 (argparse's usage errors: its usage, then one line), never a traceback; plus the CLI's manners:
--version, help for every option, empty lists that say so, errors that name the variable to fix.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent_sidecar.launcher import cli
from agent_sidecar.proxy import __version__

PY = sys.executable


def sidecar(*args: str, cwd: Path, env: dict[str, str] | None = None, input: str | None = None,
            stdout: int | None = subprocess.PIPE, program: tuple[str, ...] = (PY, "-m", "agent_sidecar.launcher")):
    return subprocess.run([*program, *args], cwd=cwd, env={**os.environ, **(env or {})}, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=60)


def no_traceback(done) -> None:
    """No traceback, and no bug reported as one line either: the edges below are all foreseen."""
    for text in (done.stdout or "", done.stderr):
        assert "Traceback" not in text and "sidecar: unexpected" not in text, text


def one_line(done) -> str:
    """The error, as the CLI prints it: exactly one `sidecar: ...` line on stderr."""
    no_traceback(done)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sidecar: "), done.stderr
    return lines[0]


def usage_error(done, prog: str) -> str:
    """argparse's way: the usage of the command at fault, then `PROG: error: ...` as the last line."""
    no_traceback(done)
    assert done.stderr.startswith(f"usage: {prog} "), done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), done.stderr
    return last


# ---- every command and action with bad arguments --------------------------------------------------------

# (args, the prog that reports a usage error, or None for the CLI's own one-line error)
BAD_ARGUMENTS = [
    (["--bogus"], "sidecar"),
    ([], "sidecar"),
    (["nosuch"], "sidecar"),
    (["run", "--bogus", "--", "true"], "sidecar run"),
    (["run", "--port", "x", "--", "true"], "sidecar run"),
    (["run", "--port", "99999", "--", "true"], "sidecar run"),
    (["run", "--cache", "bogus", "--", "true"], "sidecar run"),
    (["run"], None),
    (["run", "--"], None),
    (["run", "--config", "{tmp}/missing.toml", "--", "true"], None),
    (["run", "--restore", "nosuch", "--", PY, "-c", "pass"], None),
    (["serve", "--bogus"], "sidecar serve"),
    (["serve", "--port", "-1"], "sidecar serve"),
    (["serve", "--host", "203.0.113.9"], None),
    (["serve", "--config", "{tmp}/missing.toml"], None),
    (["config", "extra"], "sidecar config"),
    (["config", "--port", "65536"], "sidecar config"),
    (["config", "--cache", "sometimes"], "sidecar config"),
    (["config", "--config", "{tmp}/missing.toml"], None),
    (["config", "--config", "{tmp}"], None),
    (["config", "--config", "{tmp}/not.toml"], None),
    (["demo", "--bogus"], "sidecar demo"),
    (["stop", "--bogus"], "sidecar stop"),
    (["status", "extra"], "sidecar status"),
    (["top", "--bogus"], "sidecar top"),
    (["top", "--url", "nourl", "--once"], None),
    (["top", "--url", "http://127.0.0.1:{closed}", "--once"], None),
    (["top", "--once"], None),
    (["cache"], "sidecar cache"),
    (["cache", "bogus"], "sidecar cache"),
    (["cache", "stats", "--bogus"], "sidecar cache stats"),
    (["cache", "list", "--limit", "0"], "sidecar cache list"),
    (["cache", "list", "--limit", "x"], "sidecar cache list"),
    (["cache", "show"], "sidecar cache show"),
    (["cache", "show", "abc123"], None),
    (["cache", "clear", "extra"], "sidecar cache clear"),
    (["cache", "prune", "--bogus"], "sidecar cache prune"),
    (["cache", "export"], "sidecar cache export"),
    (["cache", "export", "{tmp}/no/such/dir/x.jsonl"], None),
    (["cache", "export", "{tmp}"], None),
    (["cache", "import"], "sidecar cache import"),
    (["cache", "import", "{tmp}/missing.jsonl"], None),
    (["cache", "import", "{tmp}/not.toml"], None),
    (["cache", "key", "extra"], "sidecar cache key"),
    (["cache", "list", "--config", "{tmp}/missing.toml"], None),
    (["sessions"], "sidecar sessions"),
    (["sessions", "bogus"], "sidecar sessions"),
    (["sessions", "list", "--limit", "-3"], "sidecar sessions list"),
    (["sessions", "show"], "sidecar sessions show"),
    (["sessions", "show", "nosuch"], None),
    (["sessions", "show", "last"], None),
    (["sessions", "export", "nosuch"], None),
    (["sessions", "export", "last", "--format", "yaml"], "sidecar sessions export"),
    (["sessions", "delete"], "sidecar sessions delete"),
    (["sessions", "delete", "nosuch"], None),
    (["sessions", "prune", "--older-than", "-1"], "sidecar sessions prune"),
    (["sessions", "prune", "--older-than", "soon"], "sidecar sessions prune"),
    (["sessions", "prune", "--older-than", "nan"], "sidecar sessions prune"),
    (["stats", "--since", "soon"], None),
    (["stats", "--since", "5q"], None),
    (["stats", "--by", "colour"], "sidecar stats"),
    (["stats", "--bogus"], "sidecar stats"),
    (["events", "--since", "1y"], None),
    (["events", "--bogus"], "sidecar events"),
    (["cache", "why", "nosuch"], None),
    (["cache", "why", "a", "b", "c"], None),
    (["cache", "why", "--bogus"], "sidecar cache why"),
    (["doctor", "--bogus"], "sidecar doctor"),
    (["doctor", "extra"], "sidecar doctor"),
    (["run", "--connect", "localhost:1", "--", "true"], None),
    (["run", "--connect", "http://127.0.0.1:{closed}", "--", "true"], None),
    (["run", "--connect", "http://127.0.0.1:{closed}", "--port", "5", "--", "true"], None),
]


@pytest.fixture
def closed_port() -> int:
    import socket
    with socket.socket() as sock:   # bound, never listening: connections to it are refused
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize("args,prog", BAD_ARGUMENTS, ids=[" ".join(a) or "(none)" for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_end_in_one_line_and_status_2(args, prog, tmp_path, closed_port):
    (tmp_path / "not.toml").write_text("this is [not toml\n")
    args = [a.format(tmp=tmp_path, closed=closed_port) for a in args]
    done = sidecar(*args, cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    if prog is None:
        one_line(done)
    else:
        usage_error(done, prog)


@pytest.mark.parametrize("stdin", ["not json", '{"path": 5, "body": {}}', '{"headers": [1], "body": {}}',
                                   '{"headers": {"x-api-key": 5}, "body": {}}', ""])
def test_cache_key_refuses_what_is_not_a_request(stdin, tmp_path):
    done = sidecar("cache", "key", cwd=tmp_path, input=stdin)
    assert done.returncode == 2
    assert "stdin" in one_line(done)


def test_export_to_a_missing_directory_names_the_path(tmp_path):
    target = tmp_path / "no" / "such" / "dir" / "x.jsonl"
    done = sidecar("cache", "export", str(target), cwd=tmp_path)
    assert done.returncode == 2
    line = one_line(done)
    assert str(target) in line and "No such file or directory" in line and "directory it goes in" in line
    assert not target.parent.exists()


def test_unexpected_errors_are_one_line_naming_where(monkeypatch, capsys):
    """A bug still ends in one line, with its type, message and the line of ours where it happened."""
    def broken(args):
        """A command with a bug."""
        raise RuntimeError("boom")
    monkeypatch.setitem(cli.COMMANDS, "demo", broken)
    assert cli.main(["demo"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("sidecar: unexpected RuntimeError: boom (at cli.py:") and "bug" in captured.err


# ---- a corrupt state directory --------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["cache", "list"], ["cache", "stats"], ["sessions", "list"], ["stats"]])
def test_a_corrupt_store_is_one_line(args, tmp_path, isolated_env):
    (isolated_env / "lmdb").mkdir(parents=True)
    (isolated_env / "lmdb" / "data.mdb").write_bytes(b"not an lmdb file" * 512)
    done = sidecar(*args, cwd=tmp_path)
    assert done.returncode == 2
    line = one_line(done)
    assert str(isolated_env / "lmdb" / "data.mdb") in line and "sidecar cache clear" in line   # the file and the fix


@pytest.mark.parametrize("args", [["cache", "list"], ["sessions", "list"], ["stats"], ["events"], ["status"],
                                  ["stop"], ["top", "--once"], ["cache", "export", "{tmp}/x.jsonl"]])
def test_a_state_dir_that_is_a_file_is_one_line(args, tmp_path, isolated_env):
    isolated_env.write_text("not a directory")
    done = sidecar(*[a.format(tmp=tmp_path) for a in args], cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert str(isolated_env) in one_line(done)


def test_a_corrupt_cache_entry_is_explained(tmp_path, isolated_env):
    from agent_sidecar.proxy.store import Lmdb
    store = Lmdb(isolated_env, map_size=64 << 20)
    store.write_now(lambda txn: txn.put(bytes.fromhex("ab" * 16), b"garbage", db=store.db["responses"]))
    store.close()
    done = sidecar("cache", "show", "abab", cwd=tmp_path)
    assert done.returncode == 2
    assert "unreadable" in one_line(done) and "sidecar cache prune" in done.stderr
    listing = sidecar("cache", "list", cwd=tmp_path)
    assert listing.returncode == 0 and "no cache entries" in listing.stdout


def test_a_garbled_shared_state_file_means_none_runs(tmp_path, isolated_env):
    isolated_env.mkdir(parents=True)
    (isolated_env / "shared.json").write_text("{half a json")
    for command in ("status", "stop"):
        done = sidecar(command, cwd=tmp_path)
        no_traceback(done)
        assert done.returncode == 1 and "no shared sidecar is running" in done.stdout


# ---- a reader that goes away ----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["stats", "--json"], ["stats"], ["config"], ["cache", "list"], ["cache", "stats"],
                                  ["sessions", "list"], ["events"]])
def test_a_closed_pipe_ends_quietly(args, tmp_path):
    """`sidecar stats --json | head -1`: the reader has gone before the first write (a pipe whose read end is
    closed), so every write fails; the CLI stops quietly with 141, as SIGPIPE ends a shell tool."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = sidecar(*args, cwd=tmp_path, stdout=write_end)
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""


def test_head_reads_one_line(tmp_path):
    done = subprocess.run(f"'{PY}' -m agent_sidecar.launcher stats --json | head -1", shell=True, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout == "{\n" and done.stderr == ""


# ---- manners --------------------------------------------------------------------------------------------


def test_version(tmp_path):
    done = sidecar("--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout == f"sidecar {__version__}\n"


def _parsers(parser: argparse.ArgumentParser, name: str = "sidecar"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child_name, child in action.choices.items():
                yield from _parsers(child, f"{name} {child_name}")


def test_every_option_has_help():
    for name, parser in _parsers(cli.parser()):
        assert parser.description, f"{name} --help says nothing about what it does"
        for action in parser._actions:
            if action.help is argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"


def test_every_help_runs_and_describes_its_options(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    parsers = [(n, p) for n, p in _parsers(cli.parser()) if n != "sidecar bench"]   # bench: see below
    with ThreadPoolExecutor(4) as pool:   # one process each, a few at a time
        helps = list(pool.map(lambda named: sidecar(*named[0].split()[1:], "--help", cwd=tmp_path), parsers))
    for (name, parser), done in zip(parsers, helps):
        assert done.returncode == 0 and done.stderr == "", (name, done.stderr)
        assert done.stdout.startswith(f"usage: {name} "), done.stdout
        for action in parser._actions:
            if action.help is not argparse.SUPPRESS and action.option_strings:
                assert action.option_strings[-1] in done.stdout, (name, action.option_strings)


def test_run_usage_shows_every_option(tmp_path):
    done = sidecar("run", "--help", cwd=tmp_path)
    usage = done.stdout.split("\n\n")[0]
    run = dict(_parsers(cli.parser()))["sidecar run"]
    options = [a.option_strings[0] for a in run._actions if a.option_strings and a.help is not argparse.SUPPRESS]
    assert len(options) >= 8
    for option in options:
        assert f"[{option}" in usage, (option, usage)
    assert usage.rstrip().endswith("-- CMD [ARGS...]")


def test_bench_help_names_itself(tmp_path):
    done = sidecar("bench", "--help", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("usage: sidecar bench "), done.stdout


def test_bench_bad_argument_is_a_usage_error(tmp_path):
    done = sidecar("bench", "--bogus", cwd=tmp_path)
    assert done.returncode == 2
    no_traceback(done)
    assert "unrecognized arguments: --bogus" in done.stderr.splitlines()[-1]


def test_config_goes_after_an_action_or_before_it(tmp_path):
    config = tmp_path / "sidecar.toml"
    config.write_text('[cache]\nmode = "replay"\n')
    after = sidecar("cache", "stats", "--config", str(config), cwd=tmp_path)
    before = sidecar("cache", "--config", str(config), "stats", cwd=tmp_path)
    for done in (after, before):
        assert done.returncode == 0 and "mode       replay" in done.stdout, done.stderr


def test_status_and_stop_agree_when_none_runs(tmp_path):
    status = sidecar("status", cwd=tmp_path)
    stop = sidecar("stop", cwd=tmp_path)
    assert status.returncode == stop.returncode == 1
    for done in (status, stop):
        no_traceback(done)
        assert done.stdout.startswith("sidecar: no shared sidecar is running") and done.stderr == ""
    for command in ("status", "stop"):
        assert "1 none" in sidecar(command, "--help", cwd=tmp_path).stdout   # the convention, in the help


@pytest.mark.parametrize("args,says", [(["cache", "list"], "no cache entries"), (["sessions", "list"], "no sessions"),
                                       (["events"], "no events"), (["events", "--since", "1h"], "no events in the last 1h"),
                                       (["stats"], "no calls recorded"), (["stats", "--by", "model"], "no calls"),
                                       (["stats", "--since", "15m"], "no calls recorded in the last 15m")])
def test_empty_lists_say_they_are_empty(args, says, tmp_path, isolated_env):
    done = sidecar(*args, cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith(says) and str(isolated_env) in done.stdout, done.stdout


def test_empty_json_stays_json(tmp_path):
    import json
    events = sidecar("events", "--json", cwd=tmp_path)
    assert events.returncode == 0 and events.stdout == "" and events.stderr.startswith("no events")
    stats = sidecar("stats", "--json", cwd=tmp_path)
    assert stats.returncode == 0 and json.loads(stats.stdout)["all"]["calls"] == 0


@pytest.mark.parametrize("variable,value,says", [
    ("SIDECAR_CACHE_MOD", "off", "SIDECAR_CACHE_MOD is not a setting"),
    ("SIDECAR_CACHE_MODE", "sometimes", "SIDECAR_CACHE_MODE ([cache] mode) must be one of"),
    ("SIDECAR_LIMITS_MAX_QUEUE", "many", "SIDECAR_LIMITS_MAX_QUEUE ([limits] max_queue) must be an int"),
    ("SIDECAR_PROXY_READ_TIMEOUT", "soon", "SIDECAR_PROXY_READ_TIMEOUT ([proxy] read_timeout) must be a number"),
    ("SIDECAR_STATS_RECORD", "maybe", "SIDECAR_STATS_RECORD ([stats] record) must be true or false"),
])
def test_environment_errors_name_the_variable(variable, value, says, tmp_path):
    done = sidecar("config", cwd=tmp_path, env={variable: value})
    assert done.returncode == 2
    line = one_line(done)
    assert line.startswith("sidecar: environment: ") and says in line, line


@pytest.mark.parametrize("toml,says", [("[limits]\nmax_queue = 'x'\n", "'max_queue' must be an int"),
                                       ("[proxy]\nread_timeout = 'x'\n", "'read_timeout' must be a number"),
                                       ("[stats]\nrecord = 1\n", "'record' must be true or false"),
                                       ("[cache]\nroutes = 1\n", "'routes' must be a list of strings")])
def test_file_errors_say_an_int(toml, says, tmp_path):
    path = tmp_path / "sidecar.toml"
    path.write_text(toml)
    line = one_line(sidecar("config", "--config", str(path), cwd=tmp_path))
    assert says in line and str(path) in line and " a int" not in line


# ---- files that are not what they should be: each a clear line, never "unexpected" ----------------------


@pytest.mark.parametrize("content,args,says", [
    (b"\xff\xfe[\x00p\x00r\x00o\x00x\x00y\x00]\x00", ["config"], "not UTF-8 text (byte 0xff at offset 0); save it as UTF-8"),
    (b"[proxy]\nport = 70000\n", ["config"], "'port' must be a port number (0 to 65535"),
    (b"[proxy]\nport = 70000\n", ["serve"], "'port' must be a port number (0 to 65535"),
    (b"[proxy]\nport = 70000\n", ["run", "--", "true"], "'port' must be a port number (0 to 65535"),
])
def test_a_bad_config_file_is_one_clear_line(content, args, says, tmp_path):
    path = tmp_path / "sidecar.toml"
    path.write_bytes(content)
    done = sidecar(args[0], "--config", str(path), *args[1:], cwd=tmp_path)
    assert done.returncode == 2
    line = one_line(done)
    assert says in line and str(path) in line, line


def test_a_port_variable_out_of_range_names_the_variable(tmp_path):
    line = one_line(sidecar("config", cwd=tmp_path, env={"SIDECAR_PROXY_PORT": "99999"}))
    assert "SIDECAR_PROXY_PORT ([proxy] port) must be a port number" in line


@pytest.mark.parametrize("content", ['{"url": 5, "pid": "x"}', '{"url": "nourl", "pid": 3}', "[1, 2]", "null",
                                     '{"url": "http://[::1", "pid": 3}', '{"url": "http://127.0.0.1:99999", "pid": 3}',
                                     b"\xff\xfe".decode("latin-1")])
def test_a_shared_state_file_of_the_wrong_shape_means_none_runs(content, tmp_path, isolated_env):
    isolated_env.mkdir(parents=True)
    (isolated_env / "shared.json").write_text(content)
    for command in ("status", "stop"):
        done = sidecar(command, cwd=tmp_path)
        no_traceback(done)
        assert done.returncode == 1 and "no shared sidecar is running" in done.stdout, done.stderr


@pytest.mark.parametrize("content", ['{"url": "http://127.0.0.1:99999", "pid": 3}', "[]", '{"url": "localhost:3"}',
                                     '{"url": null, "pid": 1}', "{garbled"])
def test_a_malformed_run_file_is_passed_over(content, tmp_path, isolated_env):
    (isolated_env / "run").mkdir(parents=True)
    (isolated_env / "run" / "1.json").write_text(content)
    done = sidecar("top", "--once", cwd=tmp_path)
    assert done.returncode == 2 and "no running sidecar found" in one_line(done)


@pytest.mark.parametrize("url", ["http://x:99999", "nourl", "127.0.0.1:8080", "http://[::1"])
def test_a_malformed_top_url_says_what_it_should_look_like(url, tmp_path):
    for args in (["top", "--url", url], ["top", "--url", url, "--once"]):
        done = sidecar(*args, cwd=tmp_path)
        assert done.returncode == 2 and "--url must look like http://127.0.0.1:PORT" in one_line(done)
