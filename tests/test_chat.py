"""`train_sft.py --chat`: a folder that is not a finished model of ours is one line saying what to point it at,
before any model loads; the loop keeps the conversation, /reset clears it, an empty line or EOF ends it."""

import pytest

import sft_chat
from conftest import run_cli, write_config
from sft_config import ConfigError


def finished_folder(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name in (".hh-sft-run", "model.safetensors", "metrics.json", "chat_template.jinja"):
        (folder / name).write_text("x")
    return folder


@pytest.mark.parametrize(("damage", "said"), [
    ("missing", "no such folder; point it at the save_dir of a finished run"),
    ("checkpoint", "a checkpoint (resume state), not the model a run hands off; point it at its save_dir"),
    ("no_weights", "this run has not finished (no final model yet); run the same training command to finish it"),
    ("no_metrics", "this run's final save was cut short; run the same training command to finish it, then --chat"),
    ("not_ours", "no model.safetensors; point it at the save_dir of a finished run"),
    ("no_template", "no chat template (chat_template.jinja): not a model train_sft.py saved")])
def test_a_folder_that_is_not_a_finished_model_is_one_line_saying_where_to_point(tmp_path, damage, said):
    folder = finished_folder(tmp_path / "out")
    if damage == "missing":
        folder = tmp_path / "nowhere"
    elif damage == "checkpoint":
        folder = finished_folder(tmp_path / "out" / "checkpoint-12")
    elif damage == "no_weights":
        (folder / "model.safetensors").unlink()
    elif damage == "no_metrics":
        (folder / "metrics.json").unlink()
    elif damage == "not_ours":
        (folder / ".hh-sft-run").unlink()
        (folder / "model.safetensors").unlink()
    else:
        (folder / "chat_template.jinja").unlink()
    with pytest.raises(ConfigError) as refused:
        sft_chat.check_folder(str(folder))
    assert str(refused.value).startswith(f"--chat {folder}: ") and said in str(refused.value)


def test_a_finished_folder_of_ours_passes(tmp_path):
    sft_chat.check_folder(str(finished_folder(tmp_path / "out")))


@pytest.mark.cli
def test_chat_on_an_unfinished_save_dir_is_one_line_exit_2(tmp_path, small_base_dir):
    config = write_config(tmp_path, small_base_dir)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".hh-sft-run").write_text("")
    result = run_cli("--config", str(config), "--chat", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: --chat {tmp_path / 'out'}: this run has not finished")


def test_the_loop_keeps_the_conversation_and_reset_clears_it(monkeypatch, capsys):
    import model_io

    asked = []
    monkeypatch.setattr(model_io, "model_reply", lambda model, tokenizer, messages, n, t: (
        asked.append([m["content"] for m in messages]) or (f"reply {len(asked)}", len(asked) != 2)))
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda folder: None)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda folder: type("M", (), {"eval": lambda self: self})())
    assert sft_chat.chat("f", max_new_tokens=5, lines=["a\n", "b\n", "/reset\n", "c\n", "\n", "never\n"]) == 0
    assert asked == [["a"], ["a", "reply 1", "b"], ["c"]]
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == ["assistant: reply 1", "  [stopped at <|eot_id|>]", "assistant: reply 2",
                       "  [cut at max_new_tokens 5]", "(conversation cleared)", "assistant: reply 3",
                       "  [stopped at <|eot_id|>]"]


def test_a_sharded_model_passes_and_a_checkpoint_named_alone_points_at_the_working_folder(tmp_path, monkeypatch):
    folder = finished_folder(tmp_path / "sharded")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text("{}")  # FSDP/large models: shards and their index
    sft_chat.check_folder(str(folder))
    monkeypatch.chdir(tmp_path)
    finished_folder(tmp_path / "checkpoint-4")
    with pytest.raises(ConfigError, match=r"point it at its save_dir \(\.\) once the run finished"):
        sft_chat.check_folder("checkpoint-4")


def test_chat_command_takes_the_folder_given_else_the_configs_save_dir_with_its_overrides(tmp_path, monkeypatch,
                                                                                          capsys):
    chats = []
    monkeypatch.setattr(sft_chat, "chat", lambda folder, **kw: chats.append((folder, kw)) or 0)
    config = write_config(tmp_path, "base")
    finished_folder(tmp_path / "out")
    finished_folder(tmp_path / "other")
    assert sft_chat.command(None, str(config), [], 0.0, 9) == 0
    assert sft_chat.command(str(tmp_path / "other"), str(config), [], 0.7, 5) == 0
    assert sft_chat.command(None, str(config), [f"sft_training.save_dir={tmp_path / 'other'}"], 0.0, 9) == 0
    assert chats == [(str(tmp_path / "out"), {"temperature": 0.0, "max_new_tokens": 9}),
                     (str(tmp_path / "other"), {"temperature": 0.7, "max_new_tokens": 5}),
                     (str(tmp_path / "other"), {"temperature": 0.0, "max_new_tokens": 9})]
    assert capsys.readouterr().err == ""


def test_chat_command_refuses_in_one_line_and_exit_2_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import run_env

    monkeypatch.setattr(sft_chat, "chat", lambda *a, **k: pytest.fail("a refused folder was loaded"))
    config = write_config(tmp_path, "base")
    assert sft_chat.command(None, str(config), [], 0.0, 9) == 2
    assert capsys.readouterr().err == f"error: --chat {tmp_path / 'out'}: no such folder; point it at the save_dir " \
                                      "of a finished run\n"
    assert sft_chat.command(None, str(tmp_path / "missing.yaml"), [], 0.0, 9) == 2
    assert capsys.readouterr().err.startswith("error: ")

    def wrong_stack():
        raise ConfigError("unsupported stack: test")

    monkeypatch.setattr(run_env, "check_stack", wrong_stack)
    finished_folder(tmp_path / "out")
    assert sft_chat.command(None, str(config), [], 0.0, 9) == 2
    assert capsys.readouterr().err == "error: unsupported stack: test\n"
