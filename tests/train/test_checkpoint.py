"""What a run folder holds: the saved config, compared by its hash."""

from __future__ import annotations

from forgetkit.train import TrainConfig
from forgetkit.train.checkpoint import same_config, saved_config
from forgetkit.train.config import OUTPUT_FIELDS, RUN_CONTROL_FIELDS


def test_same_config_compares_the_saved_config_up_to_the_ignored_fields(tmp_path):
    config = TrainConfig(method="mixsd", max_steps=7, output_dir=str(tmp_path / "a"))
    assert saved_config(tmp_path) is None and not same_config(tmp_path, config)
    (tmp_path / "train_config.yaml").write_text(config.to_yaml())
    assert saved_config(tmp_path) == config
    moved = TrainConfig(method="mixsd", max_steps=7, output_dir=str(tmp_path / "b"),
                        disable_tqdm=True)
    assert same_config(tmp_path, moved)  # where it writes changes no result
    evaluated = TrainConfig(method="mixsd", max_steps=7, eval_steps=5)
    assert not same_config(tmp_path, evaluated)  # other evaluations: other results
    assert same_config(tmp_path, evaluated, ignore=RUN_CONTROL_FIELDS)  # but the same weights
    assert not same_config(tmp_path, TrainConfig(method="mixsd", max_steps=8),
                           ignore=RUN_CONTROL_FIELDS)
    assert config.config_hash() != config.config_hash(OUTPUT_FIELDS - {"output_dir"})
    (tmp_path / "train_config.yaml").write_text("no_such_field: 1\n")
    assert saved_config(tmp_path) is None  # another version's config is not this run
