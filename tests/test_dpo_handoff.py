"""dpo_handoff.py: `install` edits a tree shaped like dynamic-dpo-v1 (CRLF, as upstream) and undoes it; `check`, in
the DPO repo's pinned stack (TRL 0.26.2), fails on a trainer that scores replies without their prompts, naming the
pairs that score nothing, and passes once installed: the log-probs the training loss then uses (TRL's
concatenated_forward) equal the SFT computation of sft_readiness (within 1e-3 on summed fp32 log-probs)."""

import json

import pytest

import dpo_handoff
from conftest import REAL_HH, REPO, cli_env, run_cli

DOUBLE = REPO / "tests" / "dpo_repo_double"


@pytest.fixture
def dpo_repo(tmp_path):
    """A copy of the test double of dynamic-dpo-v1, with upstream's CRLF line endings."""
    repo = tmp_path / "dynamic-dpo-v1"
    repo.mkdir()
    for path in DOUBLE.iterdir():
        if path.is_file():
            (repo / path.name).write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    return repo


def snapshot(repo):
    return {p.name: p.read_bytes() for p in sorted(repo.iterdir()) if p.is_file()}


def handoff(*args, env=None):
    return run_cli(*args, script="dpo_handoff.py", env=env)


@pytest.mark.cli
def test_install_edits_keeps_crlf_and_backups_and_is_idempotent(dpo_repo):
    before = snapshot(dpo_repo)
    first = handoff("install", "--dpo-repo", str(dpo_repo))
    assert first.returncode == 0, first.stderr
    after = snapshot(dpo_repo)
    for name in ("training.py", "risk_dpo_trainer.py", "data_process_sft.py", "train_sft.py"):
        assert after[name + dpo_handoff.BACKUP_SUFFIX] == before[name]  # every changed file kept as it was
        assert name in first.stdout
    for name in ("training.py", "risk_dpo_trainer.py"):
        text = after[name].decode()
        assert text.count("\r\n") == text.count("\n")  # CRLF kept
        assert dpo_handoff.MARK in text
    training = after["training.py"].decode()
    assert "build_HH_dataset(raw_ds)" not in training and "hh_ds = build_dpo_pairs(raw_ds, tok" in training
    assert "**dpo_length_args(" in training
    trainer = after["risk_dpo_trainer.py"].decode()
    assert "trl_sequence_logps(self, model, inputs)" in trainer and "policy_chosen_out = model(" not in trainer
    compile(trainer, "risk_dpo_trainer.py", "exec")
    compile(training, "training.py", "exec")
    for name in dpo_handoff.COPIED:
        assert after[name] == (REPO / name).read_bytes()
    second = handoff("install", "--dpo-repo", str(dpo_repo))
    assert second.returncode == 0 and "already installed" in second.stdout
    assert snapshot(dpo_repo) == after

    undo = handoff("uninstall", "--dpo-repo", str(dpo_repo))
    assert undo.returncode == 0, undo.stderr
    assert snapshot(dpo_repo) == before


@pytest.mark.cli
def test_the_pointer_left_for_the_repos_sft_script_says_where_sft_runs(dpo_repo):
    assert handoff("install", "--dpo-repo", str(dpo_repo)).returncode == 0
    result = run_cli(script=str(dpo_repo / "train_sft.py"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: SFT runs from the hh-sft repo: python /path/to/hh-sft/train_sft.py")


@pytest.mark.cli
@pytest.mark.parametrize("damage", ["unknown_line", "partly_installed", "not_a_repo"])
def test_install_refuses_a_tree_it_does_not_know_in_one_line(dpo_repo, damage):
    training = dpo_repo / "training.py"
    if damage == "unknown_line":
        training.write_bytes(training.read_bytes().replace(b"build_HH_dataset(raw_ds)", b"build_hh(raw_ds, 1)"))
    elif damage == "partly_installed":
        assert handoff("install", "--dpo-repo", str(dpo_repo)).returncode == 0
        (dpo_repo / "training.py.hh-sft-backup").replace(training)
    else:
        training.unlink()
    before = snapshot(dpo_repo)
    result = handoff("install", "--dpo-repo", str(dpo_repo))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    expected = {"unknown_line": "training.py is not a shape this handoff knows (expected 'hh_ds = build_HH_dataset",
                "partly_installed": "is partly changed by an earlier install",
                "not_a_repo": "is not a dynamic-dpo-v1 checkout (no training.py)"}[damage]
    assert expected in result.stderr
    assert snapshot(dpo_repo) == before  # nothing changed


@pytest.mark.cli
def test_check_refuses_our_own_stack_before_loading_anything(dpo_repo, tmp_path):
    result = handoff("check", "--dpo-repo", str(dpo_repo), "--model", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith("error: check runs in the DPO repo's environment (its uv.lock pins trl 0.26.2)")


def run_check(dpo_repo, model, report, stack):
    return handoff("check", "--dpo-repo", str(dpo_repo), "--model", str(model), "--data", str(REAL_HH), "-n", "12",
                   "--report", str(report), env=cli_env(PYTHONPATH=str(stack)))


@pytest.mark.slow
def test_check_fails_on_reply_only_scoring_then_passes_after_install(sft_run, dpo_stack, dpo_repo, tmp_path):
    model = sft_run[1]
    before = run_check(dpo_repo, model, tmp_path / "before.json", dpo_stack)
    assert before.returncode == 1, before.stderr[-3000:]
    seen = json.loads((tmp_path / "before.json").read_text())
    scored, expected = seen["scored_tokens"], seen["expected_tokens"]
    assert seen["state"] == "upstream" and len(seen["rows"]) >= 10
    assert sum(map(sum, scored)) < sum(map(sum, expected))
    unscored = [row for row, tokens in zip(seen["rows"], scored) if not any(tokens)]
    assert unscored  # replies shorter than their prompts score nothing
    failure = before.stderr.strip().splitlines()[-1]
    assert failure.startswith("check failed: the training loss scores")
    assert f"{len(unscored)} of {len(seen['rows'])} pairs score none (HH rows {unscored[0]}," in failure
    assert f"fix: python dpo_handoff.py install --dpo-repo {dpo_repo}" in failure

    assert handoff("install", "--dpo-repo", str(dpo_repo)).returncode == 0
    after = run_check(dpo_repo, model, tmp_path / "after.json", dpo_stack)
    assert after.returncode == 0, after.stdout[-2000:] + after.stderr[-3000:]
    seen = json.loads((tmp_path / "after.json").read_text())
    assert seen["state"] == "installed" and seen["rows"] == list(range(len(seen["rows"])))
    assert seen["scored_tokens"] == [tokens * 2 for tokens in seen["expected_tokens"]]  # every reply token, both
    for got, want in zip(seen["loss_logps"], seen["expected_logps"]):  # TRL's concatenated_forward vs readiness
        assert max(abs(g - w) for g, w in zip(got, want)) <= 1e-3
    assert "ok: the training loss scores every reply token of" in after.stdout


def test_build_dpo_dataset_drops_pairs_over_max_length_and_keeps_the_row_index(llama32_tokenizer, hh_rows):
    from datasets import Dataset

    from data_process_sft import build_dpo_dataset, tokenize_conversations

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


def test_install_copies_what_the_installed_modules_import():
    """Every module of ours that the copied files import at the top is copied too (no ImportError over there)."""
    import ast

    ours = {path.stem for path in REPO.glob("*.py")}
    for name in dpo_handoff.COPIED:
        tree = ast.parse((REPO / name).read_text())
        imported = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)} | {
            alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        assert imported & ours <= {n.removesuffix(".py") for n in dpo_handoff.COPIED}, name


def test_the_double_has_every_line_install_edits(dpo_repo):
    files, state = dpo_handoff.read_repo(dpo_repo)
    assert state == "upstream" and set(files) == {"training.py", "risk_dpo_trainer.py"}
