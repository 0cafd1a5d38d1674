"""dpo_handoff.py on a tree shaped like dynamic-dpo-v1 (CRLF, as upstream): `install` and `uninstall` are one
recorded transaction (handoff_record.py) that never touches what it did not write, survives a kill at any write, and
puts back the original byte for byte; `check`, in the DPO repo's pinned stack (TRL 0.26.2), fails on a trainer that
scores replies without their prompts and passes once installed; the installed loss trains like TRL's DPOTrainer."""

import base64
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dpo_handoff
import handoff_record
from conftest import REAL_HH, REPO, cli_env, matches_golden, run_cli, stack_env

DOUBLE = REPO / "tests" / "dpo_repo_double"
RECORD = handoff_record.RECORD


def make_repo(folder):
    """A copy of the test double of dynamic-dpo-v1, with upstream's CRLF line endings."""
    repo = Path(folder) / "dynamic-dpo-v1"
    repo.mkdir(parents=True)
    for path in DOUBLE.iterdir():
        if path.is_file():
            (repo / path.name).write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    return repo


@pytest.fixture
def dpo_repo(tmp_path):
    return make_repo(tmp_path)


def snapshot(repo):
    """Every file in the tree (hidden ones too) with its bytes."""
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}


def handoff(*args, env=None, warm=False):
    """dpo_handoff.py's command line, in this process (fast, and where mutmut and coverage see it; the script's own
    process is run by the race and run-from-inside-the-repo tests), or in a process of the stack `env` names
    (`warm`: forked from that stack's warm Python, conftest.run_cli)."""
    if env is not None:
        return run_cli(*args, script="dpo_handoff.py", env=env, warm=warm)
    import datasets
    import transformers

    logging = transformers.logging.get_verbosity(), datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = dpo_handoff.main(list(args))
        except SystemExit as e:  # argparse's usage errors
            code = e.code
        finally:  # check quiets the libraries for its table; the other tests keep their logging
            transformers.logging.set_verbosity(logging[0])
            datasets.logging.set_verbosity(logging[1])
            (datasets.enable_progress_bars if logging[2] else datasets.disable_progress_bars)()
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_refused(result, *needles):
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stdout + result.stderr
    assert result.stderr.startswith("error: ")
    for needle in needles:
        assert needle in result.stderr, result.stderr


def newer_checkout(tmp_path):
    """A copy of this checkout's handoff sources with a changed module: what an update install brings."""
    source = tmp_path / "hh-sft-newer"
    source.mkdir()
    for name in dpo_handoff.COPIED:
        (source / name).write_bytes((REPO / name).read_bytes())
    (source / "hh_sft_dpo.py").write_bytes((REPO / "hh_sft_dpo.py").read_bytes() + b"\n# a newer version\n")
    return source


def test_install_edits_records_keeps_crlf_and_uninstall_restores_every_byte(dpo_repo):
    before = snapshot(dpo_repo)
    first = handoff("install", "--dpo-repo", str(dpo_repo))
    assert first.returncode == 0, first.stderr
    after = snapshot(dpo_repo)
    record = json.loads(after[RECORD])
    assert record["state"] == "installed"
    for name, entry in record["files"].items():  # every touched path: added or changed, hashes, original bytes
        assert entry["action"] == ("changed" if name in before else "added"), name
        assert entry["written_sha256"][-1] == handoff_record.digest(after[name])
        if name in before:
            assert base64.b64decode(entry["original_base64"]) == before[name]
            assert entry["before_sha256"] == handoff_record.digest(before[name])
        else:
            assert entry["original_base64"] is None and entry["before_sha256"] is None
    assert set(record["files"]) == {"training.py", "risk_dpo_trainer.py", "hh_sft_chat.py", "hh_sft_dpo.py"}
    assert [name for name in before if after[name] != before[name]] == ["risk_dpo_trainer.py", "training.py"]
    assert set(after) == set(before) | set(record["files"]) | {RECORD}  # no backups, nothing else
    for name in dpo_handoff.EDITED:
        text = after[name].decode()
        assert text.count("\r\n") == text.count("\n") and dpo_handoff.MARK in text  # CRLF kept
        compile(text, name, "exec")
    assert "build_HH_dataset(raw_ds)" not in after["training.py"].decode()
    assert "trl_sequence_logps(self, model, inputs)" in after["risk_dpo_trainer.py"].decode()
    for name in dpo_handoff.COPIED:
        assert after[name] == (REPO / name).read_bytes()

    second = handoff("install", "--dpo-repo", str(dpo_repo))
    assert second.returncode == 0 and "already installed" in second.stdout
    assert snapshot(dpo_repo) == after

    undo = handoff("uninstall", "--dpo-repo", str(dpo_repo))
    assert undo.returncode == 0, undo.stderr
    assert snapshot(dpo_repo) == before
    again = handoff("uninstall", "--dpo-repo", str(dpo_repo))
    assert again.returncode == 0 and again.stdout.startswith("nothing installed in")
    assert snapshot(dpo_repo) == before


def test_uninstall_with_no_record_touches_nothing_not_even_the_repos_own_modules(dpo_repo):
    """Case 1: the repo's own data_process_sft.py (its train_sft.py imports it) was deleted by an uninstall that
    had nothing to undo."""
    before = snapshot(dpo_repo)
    for _ in range(2):
        result = handoff("uninstall", "--dpo-repo", str(dpo_repo))
        assert result.returncode == 0 and "nothing installed" in result.stdout and "removed" not in result.stdout
        assert snapshot(dpo_repo) == before


def test_a_stale_backup_is_never_put_back_and_user_edits_are_never_dropped_silently(dpo_repo):
    """Case 2: a NAME.hh-sft-backup left by an older install; edits made to an installed file after install."""
    stale = dpo_repo / "training.py.hh-sft-backup"
    stale.write_bytes(b"# an old copy\r\n")
    before = snapshot(dpo_repo)
    assert handoff("install", "--dpo-repo", str(dpo_repo)).returncode == 0
    training = dpo_repo / "training.py"
    edited = training.read_bytes() + b"# my own line\r\n"
    training.write_bytes(edited)
    installed = snapshot(dpo_repo)

    refused = handoff("uninstall", "--dpo-repo", str(dpo_repo))
    assert_refused(refused, "changed since the handoff wrote them: training.py", "--discard-changes")
    assert snapshot(dpo_repo) == installed  # nothing undone, the edit kept
    update = handoff("install", "--dpo-repo", str(dpo_repo))
    assert_refused(update, "changed since the handoff wrote them: training.py")
    assert snapshot(dpo_repo) == installed

    forced = handoff("uninstall", "--dpo-repo", str(dpo_repo), "--discard-changes")
    assert forced.returncode == 0, forced.stderr
    assert snapshot(dpo_repo) == before  # the original, not the stale copy; the stale copy untouched


def test_a_file_deleted_after_install_is_named_not_recreated(dpo_repo):
    assert handoff("install", "--dpo-repo", str(dpo_repo)).returncode == 0
    (dpo_repo / "risk_dpo_trainer.py").unlink()
    installed = snapshot(dpo_repo)
    assert_refused(handoff("uninstall", "--dpo-repo", str(dpo_repo)), "risk_dpo_trainer.py")
    assert snapshot(dpo_repo) == installed


KILL = """import os, sys
sys.path.insert(0, {repo!r})
import dpo_handoff
count, at, when = 0, int(sys.argv[1]), sys.argv[2]
def killing(real):
    def call(*args, **kwargs):
        global count
        count += 1
        if count == at and when == "before":
            os._exit(137)
        result = real(*args, **kwargs)
        if count == at and when == "after":
            os._exit(137)
        return result
    return call
os.replace, os.unlink = killing(os.replace), killing(os.unlink)
code = dpo_handoff.main(sys.argv[3:])
print("writes", count)
sys.exit(code)
"""


@pytest.mark.slow
def test_a_kill_at_every_write_of_install_or_uninstall_is_finished_or_undone_by_the_next_call(tmp_path):
    """Case 3: each rename or removal of install (and of uninstall) killed before and after it happens; the next
    `install` leaves the tree fully installed, the next `uninstall` leaves it byte-identical to the original (each
    kill is followed by one of the two, alternately; the property test below combines them all in process)."""
    script = tmp_path / "killed.py"
    script.write_text(KILL.format(repo=str(REPO)))

    def run(repo, at, when, *command):
        return subprocess.run([sys.executable, str(script), str(at), when, *command, "--dpo-repo", str(repo)],
                              capture_output=True, text=True, timeout=120, env=cli_env())

    reference = make_repo(tmp_path / "reference")
    original = snapshot(reference)
    counted = run(reference, 0, "never", "install")
    installed, writes = snapshot(reference), int(counted.stdout.split()[-1])
    undo_writes = int(run(make_installed(tmp_path / "count"), 0, "never", "uninstall").stdout.split()[-1])
    assert writes >= 6 and undo_writes >= 5  # the record twice and every file
    cases = [(command, at, when) for command, total in (("install", writes), ("uninstall", undo_writes))
             for at in range(1, total + 1) for when in ("before", "after")]
    for i, (command, at, when) in enumerate(cases):  # each kill recovered by the next install or uninstall, in turn
        recovery = ("install", "uninstall")[i % 2]
        repo = make_repo(tmp_path / str(i)) if command == "install" else make_installed(tmp_path / str(i))
        assert run(repo, at, when, command).returncode == 137
        finished = run(repo, 0, "never", recovery)
        assert finished.returncode == 0, (command, at, when, finished.stderr)
        assert snapshot(repo) == (installed if recovery == "install" else original), (command, at, when)


def make_installed(folder):
    repo = make_repo(folder)
    assert dpo_handoff.install(repo) == 0
    return repo


def test_an_update_from_a_newer_checkout_is_undone_to_the_original_not_to_the_older_install(dpo_repo, tmp_path):
    """Case 4: an update install once backed up the files install itself had added, and uninstall 'restored' them."""
    before = snapshot(dpo_repo)
    assert dpo_handoff.install(dpo_repo) == 0
    assert dpo_handoff.install(dpo_repo, source=newer_checkout(tmp_path)) == 0
    assert (dpo_repo / "hh_sft_dpo.py").read_bytes().endswith(b"# a newer version\n")
    record = json.loads((dpo_repo / RECORD).read_text())
    assert record["files"]["hh_sft_dpo.py"]["action"] == "added" and len(record["files"]["hh_sft_dpo.py"]
                                                                          ["written_sha256"]) == 2
    assert handoff("uninstall", "--dpo-repo", str(dpo_repo)).returncode == 0
    assert snapshot(dpo_repo) == before


@pytest.mark.cli
def test_install_is_refused_from_inside_the_dpo_repo_and_leaves_no_copy_of_itself_there(dpo_repo):
    """Case 4: a pointer once said to run dpo_handoff.py from the DPO repo, where uninstall left it behind; install
    from that copy failed half-changed. Now the tool is never copied there, and a copy run from there is refused."""
    upstream_sft = (dpo_repo / "train_sft.py").read_bytes()
    assert handoff("install", "--dpo-repo", str(dpo_repo)).returncode == 0
    assert not (dpo_repo / "dpo_handoff.py").exists()
    assert (dpo_repo / "train_sft.py").read_bytes() == upstream_sft  # upstream's own SFT script, byte for byte
    assert handoff("uninstall", "--dpo-repo", str(dpo_repo)).returncode == 0
    for name in ("dpo_handoff.py", "handoff_record.py", *dpo_handoff.COPIED):
        (dpo_repo / name).write_bytes((REPO / name).read_bytes())
    before = snapshot(dpo_repo)
    result = run_cli("install", "--dpo-repo", ".", script=str(dpo_repo / "dpo_handoff.py"), cwd=dpo_repo)
    assert_refused(result, "run install from the hh-sft checkout")
    assert snapshot(dpo_repo) == before


@pytest.mark.parametrize("damage", ["read_only", "not_utf8", "symlink", "unknown_line", "older_install", "not_repo"])
def test_install_refuses_an_unsafe_or_unknown_tree_in_one_line_before_writing_anything(dpo_repo, tmp_path, damage):
    """Case 5 (a read-only, non-UTF-8 or symlinked file) and the shapes install does not know."""
    training, outside = dpo_repo / "training.py", tmp_path / "elsewhere.py"
    if damage == "read_only":
        (dpo_repo / "risk_dpo_trainer.py").chmod(0o444)
    elif damage == "not_utf8":
        training.write_bytes(training.read_bytes().replace(b"import yaml", b"import yaml  # caf\xe9"))
    elif damage == "symlink":
        outside.write_bytes(training.read_bytes())
        training.unlink()
        training.symlink_to(outside)
    elif damage == "unknown_line":
        training.write_bytes(training.read_bytes().replace(b"build_HH_dataset(raw_ds)", b"build_hh(raw_ds, 1)"))
    elif damage == "older_install":  # an older dpo_handoff.py's edits, without a record
        assert dpo_handoff.install(dpo_repo) == 0
        (dpo_repo / RECORD).unlink()
    else:
        training.unlink()
    before, outside_before = snapshot(dpo_repo), outside.read_bytes() if outside.exists() else None
    expected = {"read_only": "risk_dpo_trainer.py is read-only", "not_utf8": "training.py is not UTF-8 text (byte",
                "symlink": "training.py is a symbolic link", "unknown_line": "training.py is not a shape this handoff "
                "knows (expected 'hh_ds = build_HH_dataset", "older_install": "but there is no handoff record",
                "not_repo": "is not a dynamic-dpo-v1 checkout (no training.py)"}[damage]
    assert_refused(handoff("install", "--dpo-repo", str(dpo_repo)), expected)
    assert snapshot(dpo_repo) == before and (outside.read_bytes() if outside.exists() else None) == outside_before
    assert training.is_symlink() == (damage == "symlink")
    if damage == "older_install":
        assert_refused(handoff("uninstall", "--dpo-repo", str(dpo_repo)), "but there is no handoff record")
        assert snapshot(dpo_repo) == before


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
def test_install_changes_only_the_lines_it_means_to_even_without_a_final_newline(tmp_path, ending):
    """Every other line of training.py (e.g. output_dir) stays byte for byte; the file's line endings and its
    missing final newline stay."""
    repo = make_repo(tmp_path)
    training = repo / "training.py"
    text = training.read_bytes().replace(b"\r\n", ending).rstrip(b"\r\n")
    training.write_bytes(text + ending + b"    main()  # last line, no newline")
    original = training.read_bytes()
    assert dpo_handoff.install(repo) == 0
    installed = training.read_bytes()
    assert not installed.endswith(b"\n") and installed.count(b"\r\n") == (installed.count(b"\n")
                                                                         if ending == b"\r\n" else 0)
    old_lines, new_lines = original.split(ending), installed.split(ending)
    removed = [line for line in old_lines if line not in new_lines]
    added = [line for line in new_lines if line not in old_lines]
    assert [line.strip() for line in removed] == [b"from dataset_process_hh import build_HH_dataset",
                                                  b"hh_ds = build_HH_dataset(raw_ds)"]
    assert len(added) == 3 and all(dpo_handoff.MARK.encode() in line for line in added)
    assert b"        output_dir=dpo_train_args['save_dir']," in new_lines
    assert dpo_handoff.uninstall(repo) == 0 and training.read_bytes() == original


class Killed(BaseException):
    """Stands for a kill: nothing after it runs (the transaction has no cleanup on the way out)."""


def killer(kill_at):
    """Wraps os.replace/os.unlink so that the kill_at-th call of either raises Killed instead of running."""
    count = [0]

    def wrap(real):
        def call(*args, **kwargs):
            count[0] += 1
            if count[0] == kill_at:
                raise Killed
            return real(*args, **kwargs)
        return call
    return wrap


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.sampled_from(["install", "update", "uninstall"]), st.integers(0, 14)),
                      min_size=1, max_size=6))
def test_any_sequence_of_install_update_uninstall_and_kills_ends_original_or_fully_installed(
        steps, tmp_path_factory, monkeypatch):
    """Property: after each command that was not killed, the tree is byte-identical to the original or to a clean
    install of the version last installed (the record aside, whose history differs); a killed command (kill at its
    k-th write, k > 0) is followed by the next command of the sequence."""
    folder = tmp_path_factory.mktemp("property")
    newer = newer_checkout(folder)
    repo = make_repo(folder)
    original = snapshot(repo)
    clean = {}
    for version, source in (("install", REPO), ("update", newer)):
        reference = make_repo(folder / version)
        dpo_handoff.install(reference, source=source)
        clean[version] = {k: v for k, v in snapshot(reference).items() if k != RECORD}
    for command, kill_at in steps:
        killing = killer(kill_at)
        with monkeypatch.context() as m:
            m.setattr(os, "replace", killing(os.replace))
            m.setattr(os, "unlink", killing(os.unlink))
            try:
                if command == "uninstall":
                    dpo_handoff.uninstall(repo)
                else:
                    dpo_handoff.install(repo, source=REPO if command == "install" else newer)
            except Killed:
                continue
        tree = snapshot(repo)
        if command == "uninstall":
            assert tree == original
        else:
            assert json.loads(tree.pop(RECORD))["state"] == "installed"
            assert tree == clean[command]


def test_the_double_has_every_line_install_edits(dpo_repo):
    assert dpo_handoff.repo_state(dpo_repo) == "upstream"


def test_install_adds_two_self_contained_files_with_names_of_their_own():
    """The payload is the chat core and hh_sft_dpo.py: no name of upstream's, no import of any other module of ours
    (anywhere in them, not only at the top: no ImportError over there, ever), no torch when imported; the edited
    lines import only those."""
    import ast

    ours = {path.stem for path in REPO.glob("*.py")}
    copied = {n.removesuffix(".py") for n in dpo_handoff.COPIED}
    assert dpo_handoff.COPIED == ("hh_sft_chat.py", "hh_sft_dpo.py")
    assert not set(dpo_handoff.COPIED) & {p.name for p in DOUBLE.iterdir()}
    for name in dpo_handoff.COPIED:
        tree = ast.parse((REPO / name).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert imported & ours <= copied, name
        top = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)} | {
            alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        assert "torch" not in top, name
    for edit in dpo_handoff.EDITS:
        for line in edit.new:
            if line.startswith("from "):
                assert line.split()[1] in copied


# --- check -------------------------------------------------------------------------------------------------------
def check_result(state, scored):
    """What check passes to _verdict for two pairs (rows 10 and 11 of --data) of 5+7 and 3+4 reply tokens."""
    return {"repo": "r", "state": state, "model": "sft_out", "data": "hh.jsonl", "max_len": 512, "rows_read": 40,
            "rows": np.array([10, 11]), "expected_tokens": np.array([[5, 7], [3, 4]]),
            "scored_tokens": np.array(scored), "dropped_by_repo_builder": 3, "dropped_by_sft_builder": 1}


def verdict(scored, diff, state="installed"):
    return dpo_handoff._verdict(check_result(state, scored), np.array(diff, dtype=float), Path("r"))


def test_check_fails_when_every_token_is_scored_but_a_pair_is_off(capsys):
    scored = [[5, 7, 5, 7], [3, 4, 3, 4]]
    assert verdict(scored, [[0, 0, 0, 0], [0, 0, 0, 0]]) == 0
    assert verdict(scored, [[0, 0, 0, 0], [0, 2e-3, 0, 0]]) == 1
    assert "1 pairs differ from the SFT log-probs by up to 0.002 (rows 11)" in capsys.readouterr().err


def test_check_counts_the_references_unscored_tokens_too(capsys):
    """A loss whose policy scores every reply token and whose reference scores none fails and says so."""
    assert verdict([[5, 7, 0, 0], [3, 4, 3, 4]], np.zeros((2, 4))) == 1
    out, err = capsys.readouterr()
    assert [line.split()[-6:] for line in out.splitlines() if "reply tokens scored (reference)" in line] == [
        ["3", "of", "8", "4", "of", "11"]]
    assert "scores 26 of 38 reply tokens" in err and "1 of 2 pairs miss reply tokens (rows 10 of --data" in err


@pytest.fixture
def model_folder(tmp_path, base_model_dir):
    """A folder shaped like the one train_sft.py saves: the base's config and weights, its tokenizer with our chat
    template and pad token."""
    from transformers import AutoTokenizer

    from model_io import prepare_tokenizer, write_portable_files

    model = tmp_path / "model"
    model.mkdir()
    for path in base_model_dir.iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    prepare_tokenizer(AutoTokenizer.from_pretrained(base_model_dir)).save_pretrained(model)
    write_portable_files(str(model))  # as the final save leaves it: loadable by the DPO repo's transformers 4.57
    return model


@pytest.mark.parametrize("damage", ["no_max_len", "no_tokenizer", "report_folder", "report_is_a_folder",
                                    "no_rejected", "no_chat_template", "no_weights", "gpt2_config"])
def test_check_refuses_bad_input_in_one_line_before_any_model_loads(dpo_repo, tmp_path, model_folder, damage):
    model, report, data = model_folder, tmp_path / "report.json", REAL_HH
    if damage == "no_chat_template":
        (model / "chat_template.jinja").unlink()
        expected = (f"--model {model}: no chat template (chat_template.jinja; expected the folder train_sft.py "
                    "saved: the DPO rows are rendered with the template SFT trained on)")
    elif damage == "no_weights":
        (model / "model.safetensors").unlink()
        expected = (f"--model {model}: no weights (model.safetensors or model.safetensors.index.json; expected the "
                    "folder train_sft.py saved, not a checkpoint-N or an unfinished run)")
    elif damage == "gpt2_config":
        (model / "model.safetensors").unlink()
        (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
        expected = (f"--model {model}: config.json describes ['GPT2LMHeadModel'], not LlamaForCausalLM (expected "
                    "the folder train_sft.py saved from a Llama-3 base)")
    elif damage == "report_is_a_folder":
        report = tmp_path
        expected = f"--report {tmp_path} is a folder: name the JSON file to write, e.g. {tmp_path / 'check.json'}"
    elif damage == "no_rejected":
        data = tmp_path / "sft_only.jsonl"
        data.write_text(json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello"}) + "\n")
        expected = (f"--data {data}: its rows have no 'rejected' field (columns: chosen); check scores preference "
                    "pairs: rows with 'chosen' and 'rejected'")
    elif damage == "no_max_len":
        config = dpo_repo / "config_dpo.yaml"
        config.write_text(config.read_text().replace("max_len: 512", "max_length: 512"))
        expected = "has no integer dataset.max_len"
    elif damage == "no_tokenizer":
        (model / "tokenizer.json").unlink()
        expected = "no tokenizer files"
    else:
        report = tmp_path / "missing" / "report.json"
        expected = f"--report {report}: its folder does not exist or is not writable"
    result = handoff("check", "--dpo-repo", str(dpo_repo), "--model", str(model), "--report", str(report),
                     "--data", str(data))
    assert_refused(result, expected)
    if damage in ("report_is_a_folder", "no_rejected", "report_folder", "no_chat_template", "no_weights",
                  "gpt2_config"):  # the whole line, word for word
        assert result.stderr == f"error: {expected}\n"


@pytest.mark.slow
def test_check_refuses_a_model_whose_vocabulary_is_smaller_than_its_tokenizer(dpo_repo, model_folder, dpo_stack):
    model = model_folder
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    result = handoff("check", "--dpo-repo", str(dpo_repo), "--model", str(model), env=stack_env(dpo_stack))
    assert_refused(result, "the tokenizer has 128,2", "tokens, the model 1,000 embedding rows",
                   "the compared pairs hold such ids")


def test_check_refuses_our_own_stack_before_loading_anything(dpo_repo, model_folder):
    result = handoff("check", "--dpo-repo", str(dpo_repo), "--model", str(model_folder))
    assert_refused(result, "check runs in the DPO repo's environment (its uv.lock pins trl 0.26.2)")


def run_check(dpo_repo, model, report, stack):
    return handoff("check", "--dpo-repo", str(dpo_repo), "--model", str(model), "--data", str(REAL_HH), "-n", "12",
                   "--report", str(report), env=stack_env(stack), warm=True)


@pytest.mark.slow
def test_check_fails_on_reply_only_scoring_then_passes_after_install(sft_run, dpo_stack, dpo_repo, tmp_path):
    model = sft_run[1]
    before = run_check(dpo_repo, model, tmp_path / "before.json", dpo_stack)
    assert before.returncode == 1, before.stderr[-3000:]
    seen = json.loads((tmp_path / "before.json").read_text())
    scored, expected = np.array(seen["scored_tokens"]), np.array(seen["expected_tokens"])
    assert seen["state"] == "upstream" and len(seen["rows"]) >= 10
    assert scored.sum() < 2 * expected.sum()
    missing = [row for row, tokens, want in zip(seen["rows"], scored, expected) if (tokens < np.tile(want, 2)).any()]
    assert missing and any(not tokens.any() for tokens in scored)  # replies shorter than their prompts score none
    failure = before.stderr.strip().splitlines()[-1]
    assert failure.startswith("check failed: the training loss scores")
    assert f"{len(missing)} of {len(seen['rows'])} pairs miss reply tokens (rows {missing[0]}," in failure
    assert f"fix: python dpo_handoff.py install --dpo-repo {dpo_repo}" in failure
    assert "minutes on a CPU" in before.stdout

    assert handoff("install", "--dpo-repo", str(dpo_repo)).returncode == 0
    after = run_check(dpo_repo, model, tmp_path / "after.json", dpo_stack)
    assert after.returncode == 0, after.stdout[-2000:] + after.stderr[-3000:]
    seen = json.loads((tmp_path / "after.json").read_text())
    assert seen["state"] == "installed" and seen["rows"] == list(range(len(seen["rows"])))
    assert seen["scored_tokens"] == [tokens * 2 for tokens in seen["expected_tokens"]]  # every reply token, both
    for got, want in zip(seen["loss_logps"], seen["expected_logps"]):  # TRL's concatenated_forward vs readiness
        assert max(abs(g - w) for g, w in zip(got, want)) <= 1e-3
    assert "ok: the training loss scores every reply token of" in after.stdout


def control_token_strings(tokenizer) -> list[str]:
    """The Llama-3 special tokens a message can hold as text: every named one (<|eot_id|>, <|start_header_id|>,
    <|begin_of_text|>, ...) and the first and last three of the 247 reserved ones (added tokens like the named ones,
    split from text by the same rule; with all 257 each check took 32-36 s instead of 12-13 s on this 2-core box)."""
    specials = [t.content for _, t in sorted(tokenizer.added_tokens_decoder.items()) if t.special]
    reserved = [s for s in specials if s.startswith("<|reserved_special_token_")]
    return [s for s in specials if s not in reserved] + reserved[:3] + reserved[-3:]


def control_token_rows(tokenizer, hh_rows, conversational: bool) -> list[dict]:
    """8 real HH pairs whose prompts and replies also hold, as literal text, the control_token_strings (one in each
    prompt, one in each reply), as HH text or as TRL's conversational preference rows."""
    from hh_sft_chat import parse_hh_to_messages

    specials = control_token_strings(tokenizer)
    per_row = -(-len(specials) // 8)
    pairs = [(parse_hh_to_messages(r["chosen"]), parse_hh_to_messages(r["rejected"])) for r in hh_rows
             if r["chosen"].count("Human:") == 1 and max(len(r["chosen"]), len(r["rejected"])) < 250]
    rows = []
    for i, (chosen, rejected) in enumerate([p for p in pairs if p[0][:-1] == p[1][:-1]][:8]):
        mine = specials[i * per_row: (i + 1) * per_row]
        for conversation in (chosen, rejected):
            conversation[0]["content"] += " " + " ".join(mine[: len(mine) // 2])
            conversation[-1]["content"] += " " + " ".join(mine[len(mine) // 2:])
        if conversational:
            rows.append({"chosen": chosen, "rejected": rejected})
        else:
            rows.append({side: "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                                       for m in conversation) for side, conversation in
                         (("chosen", chosen), ("rejected", rejected))})
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("conversational", [False, True], ids=["hh-text", "conversational"])
def test_the_installed_loss_scores_control_token_text_as_sft_trained_it(sft_run, dpo_stack, dpo_repo, tmp_path,
                                                                        conversational, llama32_tokenizer, hh_rows):
    """A message that holds "<|eot_id|>" or "<|start_header_id|>" as text: SFT trains it as text; TRL 0.26's own
    tokenize_row would make control tokens of it. The installed path hands TRL SFT's ids: check passes."""
    rows = control_token_rows(llama32_tokenizer, hh_rows, conversational)
    covered = "".join(json.dumps(row) for row in rows)
    assert all(special in covered for special in control_token_strings(llama32_tokenizer))
    data = tmp_path / "control.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert handoff("install", "--dpo-repo", str(dpo_repo)).returncode == 0
    result = handoff("check", "--dpo-repo", str(dpo_repo), "--model", str(sft_run[1]), "--data", str(data),
                     "-n", "8", "--report", str(tmp_path / "check.json"), env=stack_env(dpo_stack), warm=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    seen = json.loads((tmp_path / "check.json").read_text())
    assert len(seen["rows"]) == len(rows) == 8
    assert seen["scored_tokens"] == [tokens * 2 for tokens in seen["expected_tokens"]]


@pytest.mark.slow
def test_the_installed_loss_trains_and_logs_like_trls_dpo_trainer(sft_run, dpo_stack, dpo_repo):
    """The oracle: the installed RiskBetaDPOTrainer (beta held, as in upstream's warm-up) and TRL 0.26.2's stock
    DPOTrainer, same rows, seed and batch order: per-step loss, grad norm and TRL's metrics agree."""
    assert handoff("install", "--dpo-repo", str(dpo_repo)).returncode == 0
    (dpo_repo / "dpo_oracle_check.py").write_bytes((REPO / "tests" / "dpo_oracle_check.py").read_bytes())
    out = dpo_repo / "oracle.json"
    result = run_cli(str(sft_run[1]), str(REAL_HH), str(out), script=str(dpo_repo / "dpo_oracle_check.py"),
                     cwd=dpo_repo, env=stack_env(dpo_stack), warm=True)
    assert result.returncode == 0, result.stderr[-4000:]
    seen = json.loads(out.read_text())
    installed, stock = seen["installed"], seen["stock"]
    assert len(installed) == len(stock) == 4
    names = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"]
    for step, (ours, theirs) in enumerate(zip(installed, stock)):
        assert set(names) <= set(ours) and set(names) <= set(theirs), step
        for name in names:
            assert ours[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-5), (step, name)
    assert installed[-1]["loss"] != installed[0]["loss"]  # it trained


def test_build_dpo_dataset_drops_pairs_over_max_length_and_keeps_the_row_index(llama32_tokenizer, hh_rows):
    from datasets import Dataset

    from hh_sft_chat import build_dpo_dataset, tokenize_conversations

    raw = Dataset.from_list(hh_rows[:40])
    everything = build_dpo_dataset(raw)
    lengths = {row["row"]: max(len(ids) for ids in tokenize_conversations(
        llama32_tokenizer, [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]])) for row in everything}
    limit = sorted(lengths.values())[len(lengths) // 2]
    kept, report = build_dpo_dataset(raw, llama32_tokenizer, max_length=limit, return_report=True)
    assert sorted(kept["row"]) == sorted(row for row, length in lengths.items() if length <= limit)
    assert report.dropped["over_max_length"] == sum(length > limit for length in lengths.values())
    with pytest.raises(ValueError, match="max_length needs the tokenizer"):
        build_dpo_dataset(raw, max_length=limit)



# --- what install writes and says, exactly (mutation testing: each of these was broken and every test passed) ---
def edit_diff(before: bytes, after: bytes, name: str) -> str:
    """A unified diff whose lines show their endings (repr), so that a CR or LF out of place is visible."""
    import difflib

    lines = [[repr(line) + "\n" for line in data.splitlines(keepends=True)] for data in (before, after)]
    return "".join(difflib.unified_diff(*lines, name, name, n=1))


@pytest.mark.parametrize("ending", ["crlf", "lf"])
def test_install_edits_exactly_these_lines_keeping_each_files_line_endings(tmp_path, ending):
    repo = make_repo(tmp_path) if ending == "crlf" else Path(shutil.copytree(DOUBLE, tmp_path / "dynamic-dpo-v1"))
    training = repo / "training.py"  # a matched line with trailing blanks is matched; its ending is kept
    training.write_bytes(training.read_bytes().replace(b"hh_ds = build_HH_dataset(raw_ds)",
                                                       b"hh_ds = build_HH_dataset(raw_ds)  ").replace(
        b"output_dir=dpo_train_args['save_dir'],", b"output_dir=dpo_train_args['save_dir'],  "))
    before = {name: (repo / name).read_bytes() for name in dpo_handoff.EDITED}
    assert dpo_handoff.install(repo) == 0
    diff = "".join(edit_diff(before[name], (repo / name).read_bytes(), name) for name in dpo_handoff.EDITED)
    matches_golden(f"install_edits_{ending}.diff", diff, tmp_path)


def test_install_and_update_say_what_they_did_file_by_file(tmp_path, capsys):
    repo = make_repo(tmp_path)
    said = []
    for source in (REPO, newer_checkout(tmp_path), REPO):
        assert dpo_handoff.install(repo, source=source) == 0
        said.append(capsys.readouterr().out)
    assert dpo_handoff.install(repo) == 0
    said.append(capsys.readouterr().out)
    (tmp_path / "again").mkdir()
    newer = newer_checkout(tmp_path / "again")
    with pytest.MonkeyPatch.context() as m:  # killed after the record said "pending" and one file was written
        m.setattr(os, "replace", killer(3)(os.replace))
        with pytest.raises(Killed):
            dpo_handoff.install(repo, source=newer)
    assert dpo_handoff.install(repo, source=newer) == 0
    said.append(capsys.readouterr().out)
    text = "".join(f"--- {what}\n{out}" for what, out in zip(
        ("install", "update from a newer checkout", "back to this checkout", "again", "after a killed update"), said))
    matches_golden("install.txt", text.replace(str(repo), "<repo>"), tmp_path)
    record = json.loads((repo / RECORD).read_text())
    assert all(len(set(e["written_sha256"])) == len(e["written_sha256"]) for e in record["files"].values())
    assert (repo / RECORD).read_text().startswith('{\n "tool": "hh-sft dpo_handoff.py",\n "version": 1,\n')


def test_install_and_uninstall_keep_edits_unless_told_to_discard_them(dpo_repo):
    assert dpo_handoff.install(dpo_repo) == 0
    training = dpo_repo / "training.py"
    edited = training.read_bytes() + b"# mine\r\n"
    training.write_bytes(edited)
    for command in (dpo_handoff.install, dpo_handoff.uninstall):
        with pytest.raises(handoff_record.RecordError):
            command(dpo_repo)
        assert training.read_bytes() == edited
    assert dpo_handoff.install(dpo_repo, discard_changes=True) == 0
    assert training.read_bytes() != edited and dpo_handoff.repo_state(dpo_repo) == "installed"


def test_files_the_handoff_adds_get_the_umasks_mode_never_executable(dpo_repo):
    old = os.umask(0o022)
    try:
        assert dpo_handoff.install(dpo_repo) == 0
    finally:
        os.umask(old)
    for name in (*dpo_handoff.COPIED, RECORD):
        if not (DOUBLE / name).exists():
            assert (dpo_repo / name).stat().st_mode & 0o777 == 0o644, name


def test_a_temporary_path_taken_by_a_link_is_never_written_through(tmp_path):
    target, link = tmp_path / "target", tmp_path / ".f.hh-sft-tmp"
    target.write_bytes(b"keep")
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        handoff_record._write_atomic(tmp_path / "f", b"evil")
    assert target.read_bytes() == b"keep" and not (tmp_path / "f").exists()


def test_what_install_refuses_is_said_exactly(dpo_repo, tmp_path):
    folder = dpo_repo / "hh_sft_chat.py"
    folder.mkdir()
    with pytest.raises(handoff_record.RecordError) as refused:
        dpo_handoff.install(dpo_repo)
    assert str(refused.value) == f"{folder} is not a regular file: nothing was changed"
    folder.rmdir()
    trainer = dpo_repo / "risk_dpo_trainer.py"
    trainer.chmod(0o444)
    with pytest.raises(handoff_record.RecordError) as refused:
        dpo_handoff.install(dpo_repo)
    assert str(refused.value) == (f"{trainer} is read-only: make it writable (chmod u+w) to let the handoff change "
                                  "it; nothing was changed")
    trainer.chmod(0o644)
    temporary = dpo_repo / ".training.py.hh-sft-tmp"
    temporary.mkdir()
    with pytest.raises(handoff_record.RecordError) as refused:
        dpo_handoff.install(dpo_repo)
    assert str(refused.value) == (f"{temporary} is not a regular file: the handoff writes its temporary files there "
                                  "and never through a link; remove it, then rerun; nothing was changed")
    temporary.rmdir()
    lacking = tmp_path / "partial-checkout"
    lacking.mkdir()
    (lacking / "hh_sft_chat.py").write_text("")
    with pytest.raises(dpo_handoff.HandoffError) as refused:
        dpo_handoff.install(dpo_repo, source=lacking)
    assert str(refused.value) == (f"{lacking} lacks {', '.join(dpo_handoff.COPIED[1:])}: run install from a whole "
                                  "hh-sft checkout; nothing was changed")
    (lacking / "hh_sft_chat.py").unlink()
    with pytest.raises(dpo_handoff.HandoffError, match=rf"^{lacking} lacks hh_sft_chat\.py, hh_sft_dpo\.py: run"):
        dpo_handoff.install(dpo_repo, source=lacking)
    with pytest.raises(dpo_handoff.HandoffError) as refused:
        dpo_handoff.install(dpo_repo, source=dpo_repo)
    assert str(refused.value) == (f"run install from the hh-sft checkout (python /path/to/hh-sft/dpo_handoff.py "
                                  f"install --dpo-repo {dpo_repo}), not from a copy inside the DPO repo; nothing "
                                  "was changed")
    link = dpo_repo / "training.py"
    outside = tmp_path / "elsewhere.py"
    outside.write_bytes(link.read_bytes())
    link.unlink()
    link.symlink_to(outside)
    with pytest.raises(handoff_record.RecordError) as refused:
        dpo_handoff.install(dpo_repo)
    assert str(refused.value) == (f"{link} is a symbolic link (to {outside}): the handoff writes only regular files "
                                  "inside the repository; replace the link with the file, then rerun; nothing was "
                                  "changed")


def test_check_names_an_unknown_or_undecodable_file_exactly(dpo_repo):
    trainer = dpo_repo / "risk_dpo_trainer.py"
    multi_line = next(edit for edit in dpo_handoff.EDITS if edit.last)
    target = dpo_repo / multi_line.path
    text = target.read_bytes().replace(multi_line.last.encode(), b"# gone")
    target.write_bytes(text)
    with pytest.raises(dpo_handoff.HandoffError) as refused:
        dpo_handoff.repo_state(dpo_repo)
    assert str(refused.value) == (f"{target} is not a shape this handoff knows (expected '{multi_line.first}' ... "
                                  f"'{multi_line.last}' once; another upstream commit?): nothing was changed")
    trainer.write_bytes(b"caf\xe9\n")
    with pytest.raises(dpo_handoff.HandoffError) as refused:
        dpo_handoff.repo_state(dpo_repo)
    assert str(refused.value) == ("risk_dpo_trainer.py is not UTF-8 text (byte 3: b'\\xe9'): the handoff edits only "
                                  "UTF-8 files; nothing was changed")


@pytest.mark.parametrize(("edited", "deleted"), [(("training.py",), ("risk_dpo_trainer.py",)),
                                                 ((), ("risk_dpo_trainer.py", "training.py")), (("training.py",), ()),
                                                 (("risk_dpo_trainer.py", "training.py"), ())])
def test_changed_and_deleted_files_are_named_together(dpo_repo, edited, deleted):
    assert dpo_handoff.install(dpo_repo) == 0
    for name in edited:
        (dpo_repo / name).write_bytes(b"# mine\r\n")
    for name in deleted:
        (dpo_repo / name).unlink()
    with pytest.raises(handoff_record.RecordError) as refused:
        dpo_handoff.uninstall(dpo_repo)
    said = [f"{what} since the handoff wrote them: {', '.join(sorted(names))}"
            for what, names in (("changed", edited), ("deleted", deleted)) if names]
    assert str(refused.value) == (
        f"{'; '.join(said)} (in {dpo_repo}); nothing was changed: keep your edits elsewhere, then rerun with "
        "--discard-changes (a deleted file is put back as it was before the handoff)")


def test_apply_refuses_a_target_outside_its_scope_naming_it(dpo_repo):
    """A guard of our own callers: nothing outside the scope is ever written, whoever asks."""
    with pytest.raises(AssertionError) as refused:
        handoff_record.apply(dpo_repo, {"notes.txt": b"x", "training.py": None}, dpo_handoff.SCOPE)
    assert str(refused.value) == "['notes.txt']" and not (dpo_repo / "notes.txt").exists()


@pytest.mark.parametrize("how", ["files_put_back_by_hand", "record_copied_into_an_untouched_checkout"])
def test_uninstall_removes_a_record_whose_files_are_already_as_they_were(dpo_repo, tmp_path, how):
    before = snapshot(dpo_repo)
    assert handoff("install", "--dpo-repo", str(dpo_repo)).returncode == 0
    if how == "files_put_back_by_hand":
        for name in set(snapshot(dpo_repo)) - set(before) - {RECORD}:
            (dpo_repo / name).unlink()
        for name, data in before.items():
            (dpo_repo / name).write_bytes(data)
        repo = dpo_repo
    else:
        repo = make_repo(tmp_path / "untouched")
        (repo / RECORD).write_bytes((dpo_repo / RECORD).read_bytes())
    result = handoff("uninstall", "--dpo-repo", str(repo))
    assert result.returncode == 0 and f"{RECORD}: removed" in result.stdout
    assert not (repo / RECORD).exists() and snapshot(repo) == before


def test_an_install_made_at_15309dc_is_upgraded_to_two_files_and_uninstalled_byte_exact(tmp_path, capsys):
    """The install of 15309dc (7 of our modules copied, data_process_sft.py replaced, train_sft.py a pointer), as that
    commit's dpo_handoff.py left the double (tests/fixtures): install makes it today's two-file install, upstream's
    train_sft.py and data_process_sft.py back byte for byte; uninstall then leaves the original tree."""
    import gzip

    with gzip.open(REPO / "tests" / "fixtures" / "install_15309dc.json.gz", "rt") as f:
        older = {name: base64.b64decode(data) for name, data in json.load(f)["files"].items()}
    fresh = make_repo(tmp_path / "fresh")
    original = snapshot(fresh)
    assert dpo_handoff.install(fresh) == 0
    installed = snapshot(fresh)
    repo = tmp_path / "older" / "dynamic-dpo-v1"
    repo.mkdir(parents=True)
    for name, data in older.items():
        (repo / name).write_bytes(data)
    assert b"hh-sft" in older["train_sft.py"] and "data_formats.py" in older  # the older shape, really
    capsys.readouterr()
    assert dpo_handoff.install(repo) == 0
    said = capsys.readouterr().out
    for name in ("data_process_sft.py", "train_sft.py"):
        assert f"  {name}: restored (no longer needed)" in said
    for name in ("data_formats.py", "sft_config.py", "run_env.py", "model_io.py", "save_dir_contract.py"):
        assert f"  {name}: removed (no longer needed)" in said
    now = snapshot(repo)
    assert {k: v for k, v in now.items() if k != RECORD} == {k: v for k, v in installed.items() if k != RECORD}
    assert set(json.loads(now[RECORD])["files"]) == set(json.loads(installed[RECORD])["files"])
    assert dpo_handoff.uninstall(repo) == 0
    assert snapshot(repo) == original


def test_the_docs_list_exactly_the_files_install_writes():
    """docs/dpo-handoff.md's table of what install writes names every file install edits or adds, and no other."""
    import re

    docs = (REPO / "docs" / "dpo-handoff.md").read_text()
    table = docs[docs.index("What install writes"):docs.index("Nothing else: upstream's")]
    named = set(re.findall(r"^\s*\| `([\w.]+\.py)`", table, flags=re.M))
    assert named == {*dpo_handoff.EDITED, *dpo_handoff.COPIED}


@pytest.fixture
def saved_tokenizer(llama32_tokenizer):
    """The Llama-3.2 tokenizer as the SFT model's folder holds it: <|eot_id|> is its eos."""
    import copy

    tokenizer = copy.deepcopy(llama32_tokenizer)
    tokenizer.eos_token = "<|eot_id|>"
    return tokenizer


def test_the_rows_trl_0_26_gets_carry_sfts_token_ids_split_where_the_reply_starts(saved_tokenizer, hh_rows,
                                                                                   monkeypatch):
    """Under TRL < 1 (the DPO repo's stack) the rows hold SFT's own ids (prompt, reply + eos), which the installed
    tokenize_row hands to TRL: a literal "<|eot_id|>" in a message stays text, one eos ends each reply. Run here
    with the TRL version switched, on the control-token rows and two broken pairs."""
    from datasets import Dataset

    import hh_sft_chat
    from hh_sft_chat import build_dpo_dataset, content_token_ids, parse_hh_to_messages, tokenize_conversations

    monkeypatch.setattr(hh_sft_chat, "_trl_major", lambda: 0)
    tokenizer = saved_tokenizer
    rows = control_token_rows(tokenizer, hh_rows, conversational=False)[:4]
    broken = [{"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"},
              {"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: b"}]
    pairs, report = build_dpo_dataset(Dataset.from_list(rows[:2] + broken + rows[2:]), tokenizer, max_length=512,
                                      return_report=True)
    assert pairs["row"] == [0, 1, 4, 5] and report.rows_kept == 4
    eos = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for row, pair in zip(rows, pairs):
        chosen, rejected = parse_hh_to_messages(row["chosen"]), parse_hh_to_messages(row["rejected"])
        good, bad = tokenize_conversations(tokenizer, [chosen, rejected])
        assert pair["prompt_input_ids"] + pair["chosen_input_ids"] == good
        assert pair["prompt_input_ids"] + pair["rejected_input_ids"] == bad
        [reply] = content_token_ids(tokenizer, [chosen[-1]["content"]])
        assert pair["chosen_input_ids"] == reply + [eos] and eos not in reply  # the literal text is not eos
        assert pair["prompt"] == tokenizer.apply_chat_template(chosen[:-1], add_generation_prompt=True, tokenize=False)
    unlimited = build_dpo_dataset(Dataset.from_list(rows), tokenizer)  # no max_length: the ids all the same
    assert unlimited["chosen_input_ids"] == pairs["chosen_input_ids"]


def test_a_model_folders_json_that_cannot_be_read_counts_as_empty(tmp_path):
    path = tmp_path / "tokenizer_config.json"
    assert dpo_handoff._json_or_empty(path) == {}  # missing
    for text in (b"not json", b"[1, 2]", b'"a string"', b"\xff\xfe{}"):
        path.write_bytes(text)
        assert dpo_handoff._json_or_empty(path) == {}
    path.write_text('{"chat_template": "caf\\u00e9 \u00e9"}', encoding="utf-8")
    assert dpo_handoff._json_or_empty(path) == {"chat_template": "café é"}


@pytest.mark.parametrize("where", ["chosen_reply", "rejected_prompt", "rejected_reply"])
def test_sequences_that_do_not_end_in_the_reply_and_eos_are_refused(saved_tokenizer, where):
    """_dpo_token_ids splits SFT's ids where the reply starts; a template that renders anything else there (a
    token after the eos, another prompt on the rejected side) is refused rather than split wrong."""
    from hh_sft_chat import _dpo_token_ids, tokenize_conversations

    tokenizer = saved_tokenizer
    prompt = [{"role": "user", "content": "Why?"}]
    good, bad = {"role": "assistant", "content": "Because."}, {"role": "assistant", "content": "No."}
    sequences = tokenize_conversations(tokenizer, [prompt + [good], prompt + [bad]])
    assert _dpo_token_ids(tokenizer, [(prompt, good, bad)], sequences)["chosen_input_ids"][0][-1] == \
        tokenizer.eos_token_id
    chosen, rejected = sequences
    if where == "chosen_reply":
        chosen = chosen[:-3] + [chosen[-2], chosen[-3], chosen[-1]]  # the reply's tokens out of order
    elif where == "rejected_prompt":
        rejected = [rejected[0] + 1, *rejected[1:]]
    else:
        rejected = rejected[:-1] + [tokenizer.pad_token_id]
    with pytest.raises(ValueError, match=r"^the chat template must end each reply with its content and the eos "
                                         r"token$"):
        _dpo_token_ids(tokenizer, [(prompt, good, bad)], [chosen, rejected])
