"""TrainConfig from YAML and flags, its validation and its run hash."""

from __future__ import annotations

import pytest

from forgetkit.cli_config import ConfigError, load_config
from forgetkit.train import TrainConfig


def test_yaml_then_flags_and_nested_mix(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("method: mixsd\nlearning_rate: 1e-4\nmix:\n  lam: 0.5\n  top_k: 8\n")
    config = load_config(TrainConfig, ["--config", str(path), "--learning_rate", "3e-5",
                                       "--mix.top_k", "4", "--max_retries", "2", "--use_peft"])
    assert (config.method, config.learning_rate, config.use_peft) == ("mixsd", 3e-5, True)
    assert (config.mix.lam, config.mix.top_k, config.mix.max_retries) == (0.5, 4, 2)
    assert config.output_dir == "runs/mixsd"
    saved = tmp_path / "saved.yaml"
    saved.write_text(config.to_yaml())
    again = load_config(TrainConfig, ["--config", str(saved)])
    assert again == config and again.run_hash() == config.run_hash()
    assert load_config(TrainConfig, ["--config", str(saved), "--logging_steps", "3"]).run_hash() \
        == config.run_hash()  # run-control fields do not change the run


@pytest.mark.parametrize(("argv", "message"), [
    (["--learning_rat", "1e-3"], "did you mean 'learning_rate'"),
    (["--mix.lamb", "0.3"], "did you mean 'mix.lam'"),
    (["--method", "sftt"], "sft, mixsd, opsd"),
    (["--learning_rate", "0"], "learning_rate=0.0 must be > 0"),
    (["--learning_rate", "-1e-3"], "must be > 0"),
    (["--max_steps", "ten"], "expected an integer"),
])
def test_bad_flags_raise_clear_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        load_config(TrainConfig, argv)


def test_unknown_yaml_key_names_file_and_suggestion(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("per_device_train_batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml.*'per_device_train_batch_sise'.*"
                                          r"did you mean 'per_device_train_batch_size'"):
        load_config(TrainConfig, ["--config", str(path)])
