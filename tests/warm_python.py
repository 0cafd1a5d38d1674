"""A Python that has already imported torch, transformers, TRL and datasets, and forks a fresh child for each run of
a script: the tests of a run's behaviour (kills, resume, save_dir, the handoff check) start many runs, and each
fresh interpreter spends ~7 s of one core importing the same libraries before the script does anything.

Run as a program it is the server: it imports PRELOAD, then reads one JSON request a line from stdin and, for each,
forks a child that runs the script as `python script args...` would (argv, sys.path[0], cwd, the whole
environment, stdin from /dev/null, stdout and stderr to files, atexit handlers and non-daemon threads at the end),
answers the child's pid, waits for it and answers its exit status (negative: the signal that ended it). It ends at
EOF on stdin, so it never outlives the test process. `WarmPython` is the client a test process keeps per
environment (tests/conftest.py `run_cli(..., warm=True)`).

What a warm run does not show: what the libraries print while they are imported. Tests about a script's first
lines, its refusals before loading, or which libraries it imports run a fresh interpreter (the default)."""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import selectors
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

PRELOAD = ("torch", "transformers:AutoModelForCausalLM,AutoTokenizer,Trainer", "trl:SFTTrainer,SFTConfig,DPOTrainer,"
           "DPOConfig", "datasets", "accelerate", "peft", "matplotlib", "wandb")


def _preload() -> None:
    """Import what a run imports, in the server's environment (the children's, see WarmPython)."""
    for entry in PRELOAD:
        module, _, names = entry.partition(":")
        try:
            loaded = importlib.import_module(module)
            for name in filter(None, names.split(",")):
                getattr(loaded, name)
        except Exception:  # noqa: BLE001 — a stack without it (the DPO repo's has no peft): the child imports it
            pass


def _exit_status(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _run_child(request: dict) -> None:
    """In the forked child: become `python script *args` in `cwd` with `env`, run it, and end as Python ends."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, (path, mode) in enumerate([(os.devnull, os.O_RDONLY), (request["stdout"], os.O_WRONLY),
                                       (request["stderr"], os.O_WRONLY)]):
        os.dup2(os.open(path, mode), fd)
    script = request["script"]
    sys.argv = [script, *request["args"]]
    sys.path[0] = str(Path(script).resolve().parent)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # as Python exits on it: None is 0, an int the status, anything else printed and 1
        code = e.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException as e:  # noqa: BLE001 — what an uncaught exception does: the traceback, exit status 1
        frames = e.__traceback__
        while frames and frames.tb_frame.f_code.co_filename != script:  # from the script's frame on, as Python
            frames = frames.tb_next
        sys.excepthook(type(e), e, e.with_traceback(frames or e.__traceback__).__traceback__)
        code = 1
    threading._shutdown()  # as the interpreter ends: join non-daemon threads, run atexit handlers, flush
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code or 0)


def serve() -> None:
    answers = os.fdopen(os.dup(1), "w")  # the client reads the answers; what the libraries print goes nowhere
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    _preload()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            answers.close()
            _run_child(request)
        print(json.dumps({"pid": pid}), file=answers, flush=True)
        print(json.dumps({"status": _exit_status(os.waitpid(pid, 0)[1])}), file=answers, flush=True)


class WarmPython:
    """The client: one server per environment, started at the first run, ended with the test process."""

    def __init__(self, env: dict):
        self.server = subprocess.Popen([sys.executable, __file__], env=env, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)

    def run(self, script: str, args: list[str], cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            for path in (out, err):
                path.touch()
            request = {"script": script, "args": list(args), "cwd": str(cwd), "env": env, "stdout": str(out),
                       "stderr": str(err)}
            self.server.stdin.write(json.dumps(request) + "\n")
            self.server.stdin.flush()
            pid = json.loads(self.server.stdout.readline())["pid"]
            status = self._wait(pid, timeout)
            return subprocess.CompletedProcess([sys.executable, script, *args], status, out.read_text(),
                                               err.read_text())

    def _wait(self, pid: int, timeout: float) -> int:
        with selectors.DefaultSelector() as selector:
            selector.register(self.server.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                os.kill(pid, 9)
                self.server.stdout.readline()
                raise subprocess.TimeoutExpired(f"warm run (pid {pid})", timeout)
        return json.loads(self.server.stdout.readline())["status"]

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


if __name__ == "__main__":
    serve()
