"""Config validation and the CLI's exit codes: bad input is one line on stderr, exit 2, before any loading."""

import re
import shutil

import pytest
import yaml

from conftest import REPO, cli_env, run_cli, run_traced
from sft_config import OPTIMIZERS, ConfigError, DatasetConfig, LoraSettings, SFTTrainingConfig, load_config


def write_config(tmp_path, **sft_overrides):
    raw = yaml.safe_load((REPO / "config_dpo.yaml").read_text())
    raw["sft_training"].update(sft_overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_configs_load():
    cfg = load_config(str(REPO / "config_dpo.yaml"))
    assert cfg.policy_name == "meta-llama/Llama-3.2-1B" and cfg.precision == "bf16"
    assert cfg.dataset.dataset_name == "Anthropic/hh-rlhf" and cfg.dataset.val_ratio == 0.1
    t = cfg.sft_training
    assert (t.learning_rate, t.batch_size, t.save_dir, t.push_to_hub) == (5e-6, 16, "sft_model", False)
    assert t.wandb_project == "hh-llama32-1b-sft" and t.hub_model_id == "W-61/hh-llama32-1b-sft"
    assert load_config(str(REPO / "config_demo.yaml")).sft_training.wandb_project is None


def test_yaml_1_1_exponent_strings_are_numbers(tmp_path):
    assert load_config(str(write_config(tmp_path, learning_rate="5e-7"))).sft_training.learning_rate == 5e-7


def test_missing_keys_take_documented_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("policy_name: m\ndataset: {}\nsft_training: {}\n")
    cfg = load_config(str(path))
    assert cfg.sft_training == SFTTrainingConfig() and cfg.precision == "fp32"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"learning_rat": 1e-5}, r"unknown key 'learning_rat' in 'sft_training' \(did you mean 'learning_rate'\?\)"),
    ({"batch_size": "sixteen"}, r"sft_training\.batch_size: expected a whole number"),
    ({"batch_size": True}, r"sft_training\.batch_size: expected a whole number"),
    ({"learning_rate": True}, r"sft_training\.learning_rate: expected a number, got True"),
    ({"learning_rate": -1e-5}, r"sft_training\.learning_rate: must be greater than 0"),
    ({"epochs": 0}, r"sft_training\.epochs: must be greater than 0"),
    ({"gradient_checkpointing": "yes"}, r"sft_training\.gradient_checkpointing: expected true or false"),
    ({"lr_scheduler_type": "cosin"}, r"sft_training\.lr_scheduler_type: must be one of linear, cosine, "),
    ({"learning_rate": float("nan")}, r"sft_training\.learning_rate: must be finite, got nan"),
    ({"save_dir": None}, r"sft_training\.save_dir: must not be null"),
])
def test_bad_sft_values_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(write_config(tmp_path, **overrides)))


@pytest.mark.parametrize(("text", "message"), [
    ("policy_name: m\ndataset: {}\n", r"missing required key 'sft_training'"),
    ("policy_name: m\ndataset: {val_ratio: 1.5}\nsft_training: {}\n", r"dataset\.val_ratio: must be less than 1"),
    ("policy_name: m\ndataset: {val_ratio: 0}\nsft_training: {}\n", r"dataset\.val_ratio: must be greater than 0"),
    ("policy_name: m\nprecision: bf32\ndataset: {}\nsft_training: {}\n", r"precision: must be one of"),
    ("policy_name: m\ndataset: {}\nsft_trainig: {}\n", r"unknown key 'sft_trainig' in top level"),
    ("policy_name: m\ndataset: []\nsft_training: {}\n", r"dataset: must be a mapping of keys, got list"),
    ("- just\n- a list\n", r"must be a YAML mapping"),
    ("policy_name: [unclosed\n", r"not valid YAML"),
    ("policy_name: m\ndataset: {}\nsft_training: {}\nsft_training: {epochs: 2}\n", r"duplicate key 'sft_training'"),
    ("policy_name: m\ndataset: {}\nsft_training: {epochs: 1e300}\n", r"sft_training\.epochs: must be at most 1000"),
    ("policy_name: m\ndataset: {}\nsft_training: {max_length: 10000000}\n", r"max_length: must be at most 131072"),
])
def test_bad_files_and_sections(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


@pytest.mark.cli
@pytest.mark.cli
@pytest.mark.parametrize(("overrides", "message"), [
    ({"warmup_step": 10}, "unknown key 'warmup_step' in 'sft_training' (did you mean 'warmup_steps'?)"),
    ({"max_grad_norm": "big"}, "sft_training.max_grad_norm: expected a number, got 'big'"),
    ({"push_to_hub": True, "hub_model_id": "no-owner"}, "sft_training.hub_model_id: expected 'owner/name'"),
    ({"use_liger_kernel": True}, "use_liger_kernel: true needs liger-kernel"),  # not installed here (no GPU)
    ({"attn_implementation": "flash_attention_2"}, "flash_attention_2 needs the flash_attn package"),
    ({"attn_implementation": "flash"}, "attn_implementation: must be one of sdpa, eager"),
])
def test_cli_bad_config_exits_2_with_one_line_naming_the_problem(tmp_path, overrides, message):
    result = run_cli("--config", str(write_config(tmp_path, **overrides)))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.cli
def test_cli_missing_local_dataset_and_config_file(tmp_path):
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("Anthropic/hh-rlhf", "./nowhere/hh.jsonl"))
    result = run_cli("--config", str(path))
    assert result.returncode == 2 and "dataset.dataset_name: no such file" in result.stderr
    result = run_cli("--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2 and "cannot read config" in result.stderr


def test_readme_documents_every_key_with_its_default():
    readme = (REPO / "docs" / "configuration.md").read_text()  # the README links the full reference
    for cls, prefix in ((DatasetConfig, ""), (SFTTrainingConfig, ""), (LoraSettings, "lora.")):
        for name, field in cls.model_fields.items():
            row = re.search(rf"^\| `{prefix}{name}` \| `([^`]*)` \|", readme, re.M)
            assert row, f"README has no table row for {prefix}{name}"
            documented = cls.model_validate({name: yaml.safe_load(row.group(1))})
            assert getattr(documented, name) == field.default, name


def test_overrides_on_the_command_line_are_validated_like_the_file():
    cfg = load_config(str(REPO / "config_dpo.yaml"), ["sft_training.learning_rate=1e-5", "sft_training.epochs=2",
                                                      "dataset.val_ratio=0.2"])
    assert (cfg.sft_training.learning_rate, cfg.sft_training.epochs, cfg.dataset.val_ratio) == (1e-5, 2.0, 0.2)
    assert cfg.overrides == ("sft_training.learning_rate=1e-5", "sft_training.epochs=2", "dataset.val_ratio=0.2")
    with pytest.raises(ConfigError, match=r"unknown key 'learnin_rate' in 'sft_training' \(did you mean "):
        load_config(str(REPO / "config_dpo.yaml"), ["sft_training.learnin_rate=1e-5"])
    with pytest.raises(ConfigError, match=r"sft_training\.epochs: expected a number, got 'two'"):
        load_config(str(REPO / "config_dpo.yaml"), ["sft_training.epochs=two"])
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        load_config(str(REPO / "config_dpo.yaml"), ["sft_training.epochs"])
    assert load_config(str(REPO / "config_dpo.yaml"), ["sft_training.run_name=a=b"]).sft_training.run_name == "a=b"


@pytest.mark.parametrize(("override", "message"), [
    ("sft_trainin.epochs=2", r"^unknown key 'sft_trainin' in top level \(did you mean 'sft_training'\?\)$"),
    ("policy_name.x=1", r"^override 'policy_name\.x=1': policy_name is not a section$"),
    ("sft_training.epochs=[1", r"^override 'sft_training\.epochs=\[1': the value is not valid YAML$"),
])
def test_bad_overrides_are_one_line_naming_them(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(REPO / "config_dpo.yaml"), [override])


def test_an_override_can_fill_a_section_the_file_leaves_out(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("policy_name: m\nsft_training: {}\n")
    assert load_config(str(path), ["dataset.val_ratio=0.3"]).dataset.val_ratio == 0.3


@pytest.mark.cli
def test_cli_override_with_a_typo_is_one_line_before_torch(tmp_path):
    result, did = run_traced("--config", str(REPO / "config_dpo.yaml"), "sft_training.learnin_rate=1e-5",
                             tmp_path=tmp_path)
    assert result.returncode == 2 and did["imported"] == [] and did["connects"] == []  # before anything heavy
    assert result.stderr.strip() == ("error: unknown key 'learnin_rate' in 'sft_training' "
                                     "(did you mean 'learning_rate'?)")


def test_non_utf8_config_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"policy_name: m\xff\ndataset: {}\nsft_training: {}\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte offset 14\)"):
        load_config(str(path))


@pytest.mark.cli
def test_offline_dry_run_on_the_real_config_fails_in_seconds_naming_both_fixes(tmp_path):
    """No network (the Hub endpoint refuses): one line and exit 2 after one TCP connect, not the Hub client's
    minutes of retries, and before any model is loaded."""
    env = {k: v for k, v in cli_env(HF_ENDPOINT="http://127.0.0.1:9").items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    work = tmp_path / "work"
    work.mkdir()
    result, did = run_traced("--config", str(REPO / "config_dpo.yaml"), "--dry-run", cwd=work, env=env,
                             tmp_path=tmp_path)
    assert result.returncode == 2 and did["connects"] == [["127.0.0.1", 9]]  # one try, no retries
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot reach the Hugging Face Hub (http://127.0.0.1:9) to load "
                           "meta-llama/Llama-3.2-1B, Anthropic/hh-rlhf")
    assert "hf auth login" in line and "HF_HUB_OFFLINE=1" in line
    assert not list(work.iterdir())  # nothing created before the refusal


@pytest.mark.cli
def test_inspect_before_the_first_demo_says_to_run_the_demo(tmp_path):
    (tmp_path / "data").mkdir()
    shutil.copy(REPO / "data" / "hh_sample.jsonl", tmp_path / "data")
    result, did = run_traced("--config", str(REPO / "config_demo.yaml"), "--inspect", cwd=tmp_path,
                             script="data_process_sft.py", tmp_path=tmp_path)
    assert result.returncode == 2 and did["connects"] == [] and "transformers" not in did["imported"]
    assert result.stderr.strip() == ("error: policy_name: no such file or folder: ./demo_run/base_model "
                                     "(the demo's base model: run `python train_sft.py --demo` first)")


def test_a_section_key_given_at_the_top_level_suggests_its_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("policy_name: m\ndataset: {dataset_name: x}\nsft_training: {}\n")
    with pytest.raises(ConfigError, match=r"^unknown key 'epochs' in top level "
                                          r"\(did you mean 'sft_training\.epochs'\?\)$"):
        load_config(str(path), ["epochs=1"])


@pytest.mark.cli
def test_offline_already_set_is_not_advised_again(tmp_path):
    """With HF_HUB_OFFLINE=1 set and the model not cached, the advice is to point at a local folder, not to set
    the variable the user already set."""
    result = run_cli("--config", str(REPO / "config_dpo.yaml"), "--dry-run", cwd=tmp_path,
                     env=cli_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")))
    assert result.returncode == 2
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error")]
    assert line.startswith("error: cannot load the tokenizer meta-llama/Llama-3.2-1B: ")
    assert "HF_HUB_OFFLINE=1 is set and it is not in the local Hugging Face cache: point policy_name" in line
    assert "and set HF_HUB_OFFLINE=1" not in line


@pytest.mark.cli
def test_help_names_the_default_config():
    result = run_cli("--help")
    assert result.returncode == 0 and "(default: config_dpo.yaml)" in " ".join(result.stdout.split())


def test_the_tests_keep_wandb_runs_out_of_the_repo():
    import os

    assert not os.environ["WANDB_DIR"].startswith(str(REPO))  # conftest: offline runs go to a temporary folder


# The commands our messages and the README tell users to run: each must exist where requirements.txt installs.
PRINTED_COMMANDS = ["hf auth login", "hf upload", "hf download", "wandb login", "wandb sync", "accelerate launch"]


@pytest.mark.slow
@pytest.mark.parametrize("command", PRINTED_COMMANDS)
def test_every_command_a_message_prints_exists_in_the_installed_environment(command):
    import shutil
    import subprocess

    from conftest import REPO

    sources = "".join(p.read_text() for p in [*REPO.glob("*.py"), REPO / "README.md", *REPO.glob("docs/*.md")])
    assert command in sources  # still printed somewhere (else drop it from the list)
    assert "huggingface-cli" not in sources  # huggingface_hub 1.x installs `hf` only
    program, *words = command.split()
    assert shutil.which(program), program
    result = subprocess.run([program, *words, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-500:]


@pytest.mark.parametrize(("override", "said"), [
    ("sft_training.lr=1e-5", "unknown key 'lr' in 'sft_training' (did you mean 'sft_training.learning_rate'? 'lr' is "
                             "its name in torchtune)"),  # TRL and axolotl say learning_rate: not named
    ("sft_training.num_train_epochs=2", "did you mean 'sft_training.epochs'? 'num_train_epochs' is its name in "
                                        "TRL/transformers)"),
    ("sft_training.per_device_train_batch_size=8", "did you mean 'sft_training.batch_size'?"),
    ("sft_training.micro_batch_size=8", "did you mean 'sft_training.batch_size'? 'micro_batch_size' is its name in "
                                        "axolotl)"),
    ("sft_training.output_dir=x", "did you mean 'sft_training.save_dir'?"),
    ("sft_training.max_seq_length=256", "did you mean 'sft_training.max_length'?"),
    ("sft_training.sequence_len=256", "did you mean 'sft_training.max_length'?"),
    ("model_name_or_path=x", "did you mean 'policy_name'?")])
def test_the_names_other_tools_use_point_at_our_key(tmp_path, override, said):
    with pytest.raises(ConfigError, match=re.escape(said)):
        load_config(str(write_config(tmp_path)), [override])


@pytest.mark.cli
@pytest.mark.parametrize(("args", "said"), [
    (["--learning_rate", "1e-5"], "error: --learning_rate is not an option here: config keys are set as "
                                  "section.key=value, e.g. sft_training.learning_rate=1e-5"),
    (["--num_train_epochs=3"], "e.g. sft_training.epochs=3"),
    (["--dataset-name", "x.jsonl"], "e.g. dataset.dataset_name=x.jsonl")])
def test_a_flag_that_names_a_key_says_how_keys_are_set(args, said):
    result = run_cli(*args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.endswith(said + "\n")
    assert result.stderr.startswith("error: --")


FLAGS = {"--config", "--demo", "--dry-run", "--overwrite", "-h", "--help"}


@pytest.mark.parametrize(("args", "said"), [
    (["--learning_rate", "1e-5"], "--learning_rate is not an option here: config keys are set as section.key=value, "
                                  "e.g. sft_training.learning_rate=1e-5"),
    (["--config", "c.yaml", "--num_train_epochs=3"], "--num_train_epochs is not an option here: config keys are set as "
                                                     "section.key=value, e.g. sft_training.epochs=3"),
    (["--epochs=a=b"], "e.g. sft_training.epochs=a=b"),  # the value is everything after the first `=`
    (["--dataset-name", "x.jsonl"], "e.g. dataset.dataset_name=x.jsonl"),
    (["--dry-run", "--policy_name"], "e.g. policy_name=VALUE"),  # the last argument: no value follows
    (["--dry-run", "--lr", "3"], "e.g. sft_training.learning_rate=3")])  # another tool's name, after an option
def test_a_flag_that_names_a_key_is_answered_with_the_override_that_sets_it(args, said):
    from sft_config import flag_as_key

    hint = flag_as_key(args, FLAGS)
    assert hint is not None and hint.endswith(said)


@pytest.mark.parametrize("args", [["--config", "c.yaml"], ["--overwrite"], ["sft_training.epochs=2"],
                                  ["-epochs", "2"], ["--nonsense", "1"], ["x--epochs"], []])
def test_options_overrides_and_unknown_flags_get_no_key_hint(args):
    from sft_config import flag_as_key

    assert flag_as_key(args, FLAGS) is None


def test_a_flag_that_is_an_option_is_never_read_as_a_key():
    from sft_config import flag_as_key

    assert flag_as_key(["--epochs", "2"], {"--epochs"}) is None


@pytest.mark.parametrize(("name", "key"), [
    ("epochs", "sft_training.epochs"), ("policy_name", "policy_name"), ("learning-rate", "sft_training.learning_rate"),
    ("dataset_name", "dataset.dataset_name"), ("lr", "sft_training.learning_rate"),
    ("max_seq_len", "sft_training.max_length"), ("nonsense", None),
    ("alpha", None)])  # a key of a nested section (sft_training.lora.alpha) is not guessed
def test_key_for_names_the_dotted_key_a_bare_name_means(name, key):
    from sft_config import key_for

    assert key_for(name) == key


@pytest.mark.cli
def test_help_prints_the_commands_not_the_module_map():
    out = run_cli("--help").stdout
    assert "python train_sft.py --demo" in out and "save_dir_contract" not in out and "main()" not in out


def test_the_demo_hint_only_for_the_demos_own_missing_base(tmp_path, monkeypatch):
    import run_env

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"run `python train_sft.py --demo` first"):
        run_env.check_local("policy_name", "./demo_run/base_model")
    (tmp_path / "demo_run" / "base_model").mkdir(parents=True)
    with pytest.raises(ConfigError) as refused:
        run_env.check_local("policy_name", "./demo_run/base_modle")
    assert "--demo" not in str(refused.value) and "no such file or folder: ./demo_run/base_modle" in str(refused.value)


def test_optim_is_one_of_transformers_names_and_a_missing_package_is_one_line(tmp_path):
    from transformers.training_args import OptimizerNames

    import run_env
    from sft_trainer import build_sft_config

    assert set(OPTIMIZERS) == {o.value for o in OptimizerNames}
    cfg = load_config(str(write_config(tmp_path)), ["sft_training.optim=sgd", "sft_training.max_steps=7"])
    args = build_sft_config(cfg)
    assert args.optim == "sgd" and args.max_steps == 7
    assert build_sft_config(cfg, max_steps=10).max_steps == 10  # --dry-run's steps first
    with pytest.raises(ConfigError, match="sft_training.optim: must be one of"):
        load_config(str(write_config(tmp_path)), ["sft_training.optim=adamw"])
    eight_bit = load_config(str(write_config(tmp_path)), ["sft_training.optim=paged_adamw_8bit"])
    with pytest.raises(ConfigError, match=r"^sft_training.optim: paged_adamw_8bit needs the bitsandbytes package "
                                          r"\(pip install bitsandbytes\), or use adamw_torch_fused$"):
        run_env.check_before_loading(eight_bit)


def test_list_length_errors_name_the_right_limit(tmp_path):
    from sft_config import _one_line

    with pytest.raises(ConfigError,
                       match=r"^sft_training.lora.target_modules: must have at least 1 item\(s\), got \[\]$"):
        load_config(str(write_config(tmp_path)), ["sft_training.lora.target_modules=[]"])
    too_long = {"loc": ("sft_training", "x"), "type": "too_long", "input": [1, 2, 3],
                "ctx": {"field_type": "List", "max_length": 2, "actual_length": 3}}
    assert _one_line(too_long) == "sft_training.x: must have at most 2 item(s), got [1, 2, 3]"


@pytest.mark.parametrize(("override", "said"), [
    ("sft_training.lora.r.a.b=1", "override 'sft_training.lora.r.a.b=1': sft_training.lora.r is not a section"),
    ("sft_training.run_name.a.b=1", "override 'sft_training.run_name.a.b=1': sft_training.run_name is not a section"),
    ("sft_training.save_dir=~nosuchuser/out", "sft_training.save_dir: ~nosuchuser names no user of this machine (~/ is "
                                              "your home folder), got '~nosuchuser/out'")])
def test_an_override_into_a_value_or_an_unknown_home_folder_is_one_line(override, said):
    with pytest.raises(ConfigError) as refused:
        load_config(str(REPO / "config_dpo.yaml"), [override])
    assert str(refused.value) == said


def test_an_override_reaches_into_the_dpo_stages_free_form_sections():
    cfg = load_config(str(REPO / "config_dpo.yaml"), ["dpo_training.beta=0.2", "margin_log.extra.depth=1"])
    assert cfg.dpo_training["beta"] == 0.2 and cfg.margin_log["extra"] == {"depth": 1}


@pytest.mark.parametrize("flags", [["--demo", "--readiness"], ["--dry-run", "--readiness"], ["--demo", "--dry-run"]])
def test_two_modes_at_once_are_one_line_before_anything_runs(flags, capsys):
    import train_sft

    with pytest.raises(SystemExit) as ended:
        train_sft.parse_args(flags)
    assert ended.value.code == 2
    assert capsys.readouterr().err == (f"error: {' and '.join(flags)} are separate modes: pass one (the demo's model "
                                       "is scored with: --config config_demo.yaml --readiness)\n")


@pytest.mark.parametrize(("change", "said"), [
    ({"sft_training": {"datasets": [{"dataset_name": "x.jsonl", "fracton": 0.5}]}},
     "unknown key 'fracton' in 'sft_training.datasets.0' (did you mean 'fraction'?)"),
    ({"sft_training": {"lora": {"alhpa": 8}}}, "unknown key 'alhpa' in 'lora' (did you mean 'alpha'?)"),
    ({"sft_training": {"zzzz": 1}}, "unknown key 'zzzz' in 'sft_training'"),
    ({"sft_training": {"datasets": [{"subset": "train"}]}},
     "missing required key 'dataset_name' in 'sft_training.datasets.0'"),
    ({"policy_name": None}, "policy_name: must not be null")])
def test_a_bad_key_in_the_file_is_one_line_naming_where_it_is(tmp_path, change, said):
    raw = yaml.safe_load((REPO / "config_dpo.yaml").read_text())
    for section, value in change.items():
        raw[section] = {**raw[section], **value} if isinstance(value, dict) else value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as refused:
        load_config(str(path))
    assert str(refused.value) == said


@pytest.mark.parametrize(("override", "said"), [
    ("sft_training.lora.alhpa=8", "unknown key 'alhpa' in 'lora' (did you mean 'alpha'?)"),
    ("sft_training.lorra.alpha=8", "unknown key 'lorra' in 'sft_training' (did you mean 'lora'?)"),
    ("sft_training.epochs.x=1", "override 'sft_training.epochs.x=1': sft_training.epochs is not a section"),
    ("dpo_training.epochs.x=1", "override 'dpo_training.epochs.x=1': epochs is not a section")])  # the DPO repo's
def test_an_override_into_an_unknown_or_plain_key_names_its_section(tmp_path, override, said):
    with pytest.raises(ConfigError) as refused:
        load_config(str(write_config(tmp_path)), [override])
    assert str(refused.value) == said
