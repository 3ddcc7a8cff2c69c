"""TrainConfig (with MixConfig side by side) from YAML and flags, its validation and run hash."""

from __future__ import annotations

import pytest

from forgetkit.cli_config import ConfigError, parse_config
from forgetkit.mixsd import MixConfig
from forgetkit.train import TrainConfig


def train_config(argv: list[str]) -> TrainConfig:
    """The config ``python -m forgetkit.train`` builds from ``argv``."""
    config, mix = parse_config((TrainConfig, MixConfig), argv)
    assert config.mix is mix
    return config


def test_yaml_then_flags_and_mix_options(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("method: mixsd\nlearning_rate: 1e-4\nmix:\n  lam: 0.5\n  top_k: 8\n")
    config = train_config(["--config", str(path), "--learning_rate", "3e-5",
                           "--mix.top_k", "4", "--max_retries", "2", "--use_peft"])
    assert (config.method, config.learning_rate, config.use_peft) == ("mixsd", 3e-5, True)
    assert (config.mix.lam, config.mix.top_k, config.mix.max_retries) == (0.5, 4, 2)
    assert config.output_dir == "runs/mixsd"
    saved = tmp_path / "saved.yaml"
    saved.write_text(config.to_yaml())
    again = train_config(["--config", str(saved)])
    assert again == config and again.run_hash() == config.run_hash()
    assert train_config(["--config", str(saved), "--logging_steps", "3"]).run_hash() \
        == config.run_hash()  # run-control fields do not change the run


def test_yaml_plus_flags_equals_flags_alone(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("method: opsd\nmax_steps: 40\nlora_target_modules: [q, v]\nseed: 5\n"
                    "save_total_limit: null\nmix.seed: 7\nlam: 0.7\ndo_eval: false\n")
    layered = train_config(["--config", str(path), "--max_steps", "12", "--lam", "0.2",
                            "--lora_target_modules", "k"])
    alone = train_config(["--method", "opsd", "--max_steps", "12", "--lora_target_modules", "k",
                          "--seed", "5", "--save_total_limit", "none", "--mix.seed", "7",
                          "--lam", "0.2", "--no_do_eval"])
    assert layered == alone
    assert (alone.seed, alone.mix.seed, alone.save_total_limit, alone.do_eval) == (5, 7, None,
                                                                                  False)
    assert train_config(["--lora_target_modules", "q", "--lora_target_modules", "v"]) \
        .lora_target_modules == ["q", "v"]  # a repeated list option adds to the list


@pytest.mark.parametrize(("argv", "message"), [
    (["--learning_rat", "1e-3"], "unknown option --learning_rat.*did you mean '--learning_rate'"),
    (["--mix.lamb", "0.3"], "did you mean '--mix.lam'"),
    (["--method", "sftt"], "'sft', 'mixsd', 'opsd'"),
    (["--learning_rate", "0"], "learning_rate=0.0 must be > 0"),
    (["--learning_rate=-1e-3"], "must be > 0"),
    (["--max_steps", "ten"], "--max_steps.*invalid int value: 'ten'"),
    (["--lam", "2"], r"lam=2.0 must be in \[0, 1\]"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_flags_raise_clear_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        train_config(argv)


@pytest.mark.parametrize(("text", "message"), [
    ("per_device_train_batch_sise: 4\n", "'per_device_train_batch_sise'.*"
                                         "did you mean 'per_device_train_batch_size'"),
    ("mix:\n  lamb: 0.3\n", "'mix.lamb'.*did you mean 'mix.lam'"),
    ("max_steps: 1.5\n", "max_steps: 1.5 is not a valid integer"),
    ("learning_rate: fast\n", "learning_rate: 'fast' is not a valid number"),
    ("use_peft: maybe\n", "use_peft: 'maybe' is not a valid boolean"),
    ("method: dpo\n", "method: 'dpo' is not one of sft, mixsd, opsd"),
    ("seed: null\n", "seed: null is not allowed"),
    ("lora_target_modules: {q: 1}\n", "lora_target_modules: expected one string, got a dict"),
    ("- method\n", "expected a mapping of option names, got list"),
])
def test_bad_yaml_names_file_and_key(tmp_path, text, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"cfg\.yaml.*" + message):
        train_config(["--config", str(path)])
