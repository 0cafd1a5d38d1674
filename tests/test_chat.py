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
