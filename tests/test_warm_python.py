"""The warm Python (tests/warm_python.py) that the run tests use ends and reports a script as a fresh interpreter
does: exit status, stdout, stderr (a traceback from the script's frame on), argv, cwd, sys.path[0], environment,
stdin, atexit handlers."""

import pytest

from conftest import run_cli

PROBE = """import atexit, json, os, sys
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0],
                  "wandb_mode": os.environ.get("WANDB_MODE"), "stdin": sys.stdin.read()}))
print("to stderr", file=sys.stderr)
atexit.register(lambda: print("atexit ran"))
how = sys.argv[1]
if how == "exit":
    sys.exit(3)
if how == "message":
    sys.exit("a message")
if how == "kill":
    os._exit(137)
if how == "raise":
    raise ValueError("boom")
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ok", "exit", "message", "kill", "raise"])
def test_a_warm_run_ends_and_reports_as_a_fresh_interpreter_does(tmp_path, how):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    fresh = run_cli(how, script=str(script), cwd=tmp_path)
    warm = run_cli(how, script=str(script), cwd=tmp_path, warm=True)
    assert (warm.returncode, warm.stdout, warm.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert fresh.returncode == {"ok": 0, "exit": 3, "message": 1, "kill": 137, "raise": 1}[how]
    assert ("atexit ran" in warm.stdout) == (how != "kill") and '"wandb_mode": "offline"' in warm.stdout
