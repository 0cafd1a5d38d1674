"""The handoff record and lock under a hostile or careless DPO repo (issue: the fourth trial): a record read from
someone else's repo is checked whole before anything is taken from it; one handoff at a time; a temporary path is
never written through; a file the user deleted after install is named, and put back with --discard-changes; the
advice for a repo changed by the older, record-less handoff puts back every byte."""

import base64
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import dpo_handoff
import handoff_record
from conftest import REPO, cli_env
from test_dpo_handoff import assert_refused, handoff, make_installed, make_repo, snapshot

RECORD = handoff_record.RECORD


@pytest.fixture
def dpo_repo(tmp_path):
    return make_repo(tmp_path)


def entry(action, original=None, written=b"x"):
    """An entry as the tool writes it (original bytes and their sha256 when 'changed')."""
    return {"action": action, "before_sha256": handoff_record.digest(original),
            "written_sha256": [handoff_record.digest(written)],
            "original_base64": None if original is None else base64.b64encode(original).decode()}


def record(files, **top):
    return json.dumps({"tool": handoff_record.TOOL, "version": 1, "state": "installed", "files": files, **top})


def hostile_records(repo, victim):
    """name -> (record bytes or a callable that puts the record in place, what the refusal names)."""
    training = (repo / "training.py").read_bytes()
    return {
        "absolute_path": (record({str(victim): entry("added", written=victim.read_bytes())}),
                          f"entry '{victim}': a path outside the repository"),
        "parent_path": (record({"../victim.txt": entry("changed", b"evil\n", written=victim.read_bytes())}),
                        "entry '../victim.txt': a path outside the repository"),
        "unknown_name": (record({"notes.txt": entry("added")}), "entry 'notes.txt': not one of the files"),
        "original_not_its_sha": (record({"training.py": {**entry("changed", training, written=training),
                                                         "original_base64": base64.b64encode(b"evil").decode()}}),
                                 "the stored original does not match its before_sha256"),
        "upstream_marked_added": (record({"training.py": entry("added", written=training)}),
                                  "entry 'training.py' is marked 'added' but the handoff never adds that file"),
        "files_a_list": (record(["training.py"]), "'files' is not an object"),
        "other_version": (record({}, version=2), "version 2; this tool reads version 1"),
        "not_json": (b"{\"tool\": ", "is not a record this tool wrote"),
        "not_base64": (record({"training.py": {**entry("changed", training), "original_base64": "%%%"}}),
                       "original_base64 is not base64"),
        "a_folder": (lambda path: path.mkdir(), "is not a file: not a record this tool wrote"),
        "a_link": (lambda path: path.symlink_to(victim), "is a symbolic link: not a record this tool wrote"),
    }


CASES = ["absolute_path", "parent_path", "unknown_name", "original_not_its_sha", "upstream_marked_added",
         "files_a_list", "other_version", "not_json", "not_base64", "a_folder", "a_link"]


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_record_is_refused_in_one_line_and_nothing_inside_or_outside_the_repo_is_touched(tmp_path, case):
    repo = make_installed(tmp_path / "installed") if case in ("parent_path", "absolute_path") else \
        make_repo(tmp_path / "clean")
    victim = tmp_path / "victim.txt" if case != "parent_path" else repo.parent / "victim.txt"
    victim.write_bytes(b"a file of the user's, outside the DPO repo\n")
    written, needle = hostile_records(repo, victim)[case]
    path = repo / RECORD
    if callable(written):
        path.unlink(missing_ok=True)
        written(path)
    else:
        path.write_bytes(written if isinstance(written, bytes) else written.encode())
    before, outside = snapshot(repo), victim.read_bytes()
    for command in ("uninstall", "install"):
        for extra in ((), ("--discard-changes",)):
            result = handoff(command, "--dpo-repo", str(repo), *extra)
            assert_refused(result, str(path), needle, "git checkout", f"delete {RECORD}")
            assert snapshot(repo) == before and victim.read_bytes() == outside, (command, extra)


def test_a_leftover_symlink_at_a_temporary_path_is_never_written_through_nor_deleted(dpo_repo, tmp_path):
    outside = tmp_path / "outside.py"
    outside.write_bytes(b"# the user's file\n")
    link = dpo_repo / ".training.py.hh-sft-tmp"
    link.symlink_to(outside)
    before = snapshot(dpo_repo)
    assert_refused(handoff("install", "--dpo-repo", str(dpo_repo)), f"{link} is a symbolic link", "remove it")
    assert snapshot(dpo_repo) == before and link.is_symlink() and outside.read_bytes() == b"# the user's file\n"


def test_a_changed_file_the_user_deleted_is_named_and_put_back_with_discard_changes(dpo_repo):
    original = snapshot(dpo_repo)
    assert handoff("install", "--dpo-repo", str(dpo_repo)).returncode == 0
    (dpo_repo / "training.py").unlink()
    installed = snapshot(dpo_repo)
    for command in ("uninstall", "install"):
        assert_refused(handoff(command, "--dpo-repo", str(dpo_repo)),
                       "deleted since the handoff wrote them: training.py", "--discard-changes")
        assert snapshot(dpo_repo) == installed
    result = handoff("uninstall", "--dpo-repo", str(dpo_repo), "--discard-changes")
    assert result.returncode == 0, result.stderr
    assert "training.py: restored as it was before" in result.stdout
    assert snapshot(dpo_repo) == original


def test_install_keeps_the_mode_of_a_file_it_changes_and_uninstall_puts_it_back(dpo_repo):
    training = dpo_repo / "training.py"
    training.chmod(0o750)
    assert dpo_handoff.install(dpo_repo) == 0
    assert training.stat().st_mode & 0o777 == 0o750
    assert dpo_handoff.uninstall(dpo_repo) == 0
    assert training.stat().st_mode & 0o777 == 0o750


def test_the_advice_for_an_older_record_less_install_puts_back_every_byte(tmp_path):
    """The handoff before the record (90b27bd..f9b130a) edited four files, kept NAME.hh-sft-backup copies of them
    and added five modules; the refusal's command, run as printed, leaves the repo as git has it."""
    repo = make_repo(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "core.autocrlf=false"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "upstream"], cwd=repo, check=True)
    original = {k: v for k, v in snapshot(repo).items() if not k.startswith(".git/")}
    installed = make_installed(tmp_path / "reference")
    for name in ("training.py", "risk_dpo_trainer.py", "train_sft.py", "data_process_sft.py"):
        shutil.copy(repo / name, repo / f"{name}.hh-sft-backup")
        (repo / name).write_bytes((installed / name).read_bytes())
    for name in dpo_handoff.OLDER_ADDED:
        (repo / name).write_bytes(b"# copied by the older handoff\n")
    result = handoff("install", "--dpo-repo", str(repo))
    assert_refused(result, "but there is no handoff record")
    command = result.stderr.split(f"(in {repo}: ", 1)[1].split("), then rerun")[0]
    subprocess.run(command, shell=True, cwd=repo, check=True)
    assert {k: v for k, v in snapshot(repo).items() if not k.startswith(".git/")} == original


RACE = """import sys
sys.path.insert(0, sys.argv[1])  # the hh-sft checkout to run from (an update runs from a newer one)
import os, time
import dpo_handoff
open(f"{sys.argv[2]}.ready-{os.getpid()}", "w").close()
while not os.path.exists(sys.argv[2]):  # both processes start their command when the test says go
    time.sleep(0.001)
sys.exit(dpo_handoff.main(sys.argv[3:]))
"""


@pytest.mark.cli
@pytest.mark.parametrize("pair", [("install", "install"), ("install", "uninstall"), ("install", "update")])
def test_two_handoffs_at_once_run_one_after_the_other(tmp_path, pair):
    """Two real processes started together, eight rounds: both exit 0 and the tree ends as one of the two orders
    would leave it (the record valid JSON). Without the lock, 3-5 of 10 rounds raised FileNotFoundError."""
    script = tmp_path / "race.py"
    script.write_text(RACE)
    newer = tmp_path / "hh-sft-newer"
    newer.mkdir()
    for name in {*dpo_handoff.COPIED, "dpo_handoff.py", "handoff_record.py"}:
        newer.joinpath(name).write_bytes((REPO / name).read_bytes())
    newer.joinpath("model_io.py").write_bytes((REPO / "model_io.py").read_bytes() + b"\n# a newer version\n")
    for round_ in range(8):
        repo = make_installed(tmp_path / str(round_)) if "uninstall" in pair and round_ % 2 else \
            make_repo(tmp_path / str(round_))
        original = snapshot(make_repo(tmp_path / f"original-{round_}"))
        go = tmp_path / f"go-{round_}"
        processes = [subprocess.Popen(
            [sys.executable, str(script), str(newer if command == "update" else REPO), str(go),
             "uninstall" if command == "uninstall" else "install", "--dpo-repo", str(repo)],
            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for command in pair]
        while len(list(tmp_path.glob(f"go-{round_}.ready-*"))) < 2:  # both have imported and wait
            time.sleep(0.005)
        go.touch()
        results = [process.communicate(timeout=120) for process in processes]
        for process, (out, err) in zip(processes, results):
            assert process.returncode == 0, (pair, round_, out, err)
        tree = snapshot(repo)
        if RECORD in tree:
            assert json.loads(tree.pop(RECORD))["state"] == "installed"
            assert tree.keys() == {*original, *dpo_handoff.COPIED}
        else:
            assert tree == original


SHA = "a" * 64
GOOD_ORIGINAL = base64.b64encode(b"upstream\n").decode()


def files_entry(name, action, before=None, written=None, original=None):
    """A record whose one entry holds these raw field values (written: [SHA] unless given), for _parse to judge."""
    return {"state": "installed", "files": {name: {"action": action, "before_sha256": before,
                                                   "written_sha256": [SHA] if written is None else written,
                                                   "original_base64": original}}}


@pytest.mark.parametrize(("data", "said"), [
    ([], 'no "tool": "hh-sft dpo_handoff.py"'),
    ({"tool": "another-tool", "version": 1, "state": "installed", "files": {}}, 'no "tool": "hh-sft dpo_handoff.py"'),
    ({"version": 3, "state": "installed", "files": {}}, "version 3; this tool reads version 1"),
    ({"state": "done", "files": {}}, "state 'done' is neither 'pending' nor 'installed'"),
    ({"state": "installed"}, "'files' is not an object of file name -> entry"),
    ({"state": "installed", "files": {"training.py": []}},
     "entry 'training.py' is not an object with action, before_sha256, written_sha256, original_base64"),
    ({"state": "installed", "files": {"model_io.py": {"action": "added", "before_sha256": None,
                                                     "written_sha256": [SHA], "original_base64": None, "x": 1}}},
     "entry 'model_io.py' is not an object with action, before_sha256, written_sha256, original_base64"),
    (files_entry("model_io.py", "deleted"),
     "entry 'model_io.py': action 'deleted' is neither 'added' nor 'changed'"),
    (files_entry("model_io.py", "added", written=SHA),
     "entry 'model_io.py': written_sha256 is not a list of sha256 hex digests"),
    (files_entry("model_io.py", "added", written=[SHA, "b" * 63]),
     "entry 'model_io.py': written_sha256 is not a list of sha256 hex digests"),
    (files_entry("model_io.py", "added", written=[7]),
     "entry 'model_io.py': written_sha256 is not a list of sha256 hex digests"),
    (files_entry("model_io.py", "added", before=SHA),
     "entry 'model_io.py' is 'added' but carries original bytes"),
    (files_entry("model_io.py", "added", original=GOOD_ORIGINAL),
     "entry 'model_io.py' is 'added' but carries original bytes"),
    (files_entry("training.py", "changed", original=GOOD_ORIGINAL),
     "entry 'training.py' is 'changed' but lacks its before_sha256 or original_base64"),
    (files_entry("training.py", "changed", before="z" * 64, original=GOOD_ORIGINAL),
     "entry 'training.py' is 'changed' but lacks its before_sha256 or original_base64"),
    (files_entry("training.py", "changed", before=SHA),
     "entry 'training.py' is 'changed' but lacks its before_sha256 or original_base64"),
    (files_entry("training.py", "added"),
     "entry 'training.py' is marked 'added' but the handoff never adds that file (it exists in the repository "
     "before any install)"),
    (files_entry("training.py", "changed", before=SHA, original=GOOD_ORIGINAL),
     "entry 'training.py': the stored original does not match its before_sha256 (it is not the file as it was)"),
])
def test_each_rule_of_the_record_is_refused_with_its_own_reason(data, said):
    if isinstance(data, dict) and "tool" not in data:
        data = {"tool": handoff_record.TOOL, **data}
    with pytest.raises(ValueError) as refused:
        handoff_record._parse(data, dpo_handoff.SCOPE)
    assert str(refused.value) == said


def test_a_record_of_ours_reads_back_as_written_and_one_without_a_version_is_version_one():
    original = b"upstream\n"
    files = {"training.py": {"action": "changed", "before_sha256": handoff_record.digest(original),
                             "written_sha256": [SHA], "original_base64": base64.b64encode(original).decode()},
             "model_io.py": {"action": "added", "before_sha256": None, "written_sha256": [SHA, "b" * 64],
                             "original_base64": None}}
    for top in ({"version": 1}, {}):
        record = handoff_record._parse({"tool": handoff_record.TOOL, "state": "pending", "files": files, **top},
                                       dpo_handoff.SCOPE)
        assert record.pending and record.entries["training.py"].original == original
        assert record.entries["model_io.py"] == handoff_record.Entry(None, None, [SHA, "b" * 64])


def test_a_repo_changed_in_one_file_of_two_is_partly_changed(dpo_repo):
    """repo_state for check: upstream, installed, or half of one install (finish it first)."""
    assert dpo_handoff.repo_state(dpo_repo) == "upstream"
    upstream = {name: (dpo_repo / name).read_bytes() for name in dpo_handoff.EDITED}
    assert dpo_handoff.install(dpo_repo) == 0
    assert dpo_handoff.repo_state(dpo_repo) == "installed"
    first = dpo_handoff.EDITED[0]
    (dpo_repo / first).write_bytes(upstream[first])
    with pytest.raises(dpo_handoff.HandoffError) as partly:
        dpo_handoff.repo_state(dpo_repo)
    assert str(partly.value) == (f"{dpo_repo} is partly changed by the handoff: run `python dpo_handoff.py install "
                                 f"--dpo-repo {dpo_repo}` (or uninstall) to finish what was interrupted, then rerun")


# --- what the writes themselves must be (issue: held-out mutants of last round's code) --------------------------
def traced_install(repo, monkeypatch):
    """Install with os.open / os.fsync / os.replace traced: [(call, path)] in order (fsync by the fd's path)."""
    calls = []
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def traced_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if flags & (os.O_WRONLY | os.O_RDWR):
            calls.append(("open", os.path.realpath(path)))
        return fd

    def traced_fsync(fd):
        calls.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def traced_replace(src, dst, *args, **kwargs):
        calls.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "open", traced_open)
    monkeypatch.setattr(os, "fsync", traced_fsync)
    monkeypatch.setattr(os, "replace", traced_replace)
    assert dpo_handoff.install(repo) == 0
    monkeypatch.undo()
    return calls


def test_every_file_is_written_to_a_temporary_flushed_to_disk_then_renamed_never_in_place(dpo_repo, monkeypatch):
    calls = traced_install(dpo_repo, monkeypatch)
    record = json.loads((dpo_repo / RECORD).read_text())
    targets = {str((dpo_repo / name).resolve()) for name in [*record["files"], RECORD]}
    renamed = {call[2]: call[1] for call in calls if call[0] == "replace"}
    assert targets <= set(renamed)  # every file we wrote arrived by a rename
    opened = [call[1] for call in calls if call[0] == "open"]
    assert opened and all(path.endswith(handoff_record.TEMPORARY) for path in opened)  # never a target in place
    for i, call in enumerate(calls):
        if call[0] == "replace":  # its temporary file was fsynced before the rename
            assert ("fsync", call[1]) in calls[:i], call


@pytest.mark.parametrize("newline", [b"\r\n", b"\n"])
def test_inserted_lines_take_the_files_ending_when_the_matched_line_is_the_last_without_one(tmp_path, newline):
    repo = make_repo(tmp_path)
    training = repo / "training.py"
    text = training.read_bytes().replace(b"\r\n", newline)
    line = b"output_dir=dpo_train_args['save_dir'],"
    start = text.index(line)
    training.write_bytes(text[:start + len(line)])  # the matched line is last, no newline after it
    assert dpo_handoff.install(repo) == 0
    installed = training.read_bytes()
    tail = installed[installed.index(line):]
    assert tail.count(b"\n") == 1 and tail.count(newline) == 1  # the file's own ending between, none added
    assert tail.startswith(line + newline) and not tail.endswith(b"\n") and dpo_handoff.MARK.encode() in tail


def test_a_line_matched_twice_is_refused_in_one_line(dpo_repo):
    training = dpo_repo / "training.py"
    line = b"hh_ds = build_HH_dataset(raw_ds)"
    training.write_bytes(training.read_bytes().replace(line, line + b"\r\n    " + line))
    before = snapshot(dpo_repo)
    assert_refused(handoff("install", "--dpo-repo", str(dpo_repo)), "training.py is not a shape this handoff knows "
                   "(expected 'hh_ds = build_HH_dataset(raw_ds)' once")
    assert snapshot(dpo_repo) == before


def test_an_update_from_a_checkout_that_no_longer_ships_a_file_removes_it(dpo_repo, monkeypatch):
    original = snapshot(dpo_repo)
    assert dpo_handoff.install(dpo_repo) == 0
    monkeypatch.setattr(dpo_handoff, "COPIED", tuple(n for n in dpo_handoff.COPIED if n != "save_dir_contract.py"))
    assert dpo_handoff.install(dpo_repo) == 0
    assert not (dpo_repo / "save_dir_contract.py").exists()
    assert "save_dir_contract.py" not in json.loads((dpo_repo / RECORD).read_text())["files"]
    assert dpo_handoff.uninstall(dpo_repo) == 0 and snapshot(dpo_repo) == original


def test_the_dpo_loss_never_cuts_a_prompt_at_trls_default_512():
    from hh_sft_dpo import dpo_length_args

    args = dpo_length_args(1024)
    assert args["max_length"] == 1024 and args["max_prompt_length"] is None and args["max_completion_length"] is None
