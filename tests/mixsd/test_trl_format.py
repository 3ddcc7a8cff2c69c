"""MixSD targets as TRL prompt-completion data: rows, the JSONL of ``--format trl``, the
checked reader, and that TRL's SFTTrainer trains on forgetkit's own MixSD tokens."""

from __future__ import annotations

import copy
import json

import pytest

from forgetkit.data.records import RecordError, load_records
from forgetkit.files import read_jsonl
from forgetkit.mixsd import MixConfig, MixedTarget, build_targets, main
from forgetkit.mixsd.trl_format import load_trl_dataset, to_trl_dataset, trl_rows

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def few_records():
    return load_records("kgfact")[:6]


@pytest.fixture(scope="module")
def targets(toyworld, few_records):
    model, tokenizer = toyworld
    return build_targets(model, tokenizer, few_records, MixConfig(lam=0.3))


def test_rows_standard_and_conversational(targets, few_records):
    rows = trl_rows(targets, few_records)
    assert [r["record_id"] for r in rows] == [t.record_id for t in targets]
    by_id = {r.id: r for r in few_records}
    for row, target in zip(rows, targets, strict=True):
        assert row["prompt"] == by_id[target.record_id].prompt
        assert row["completion"].startswith(" ") and row["completion"].strip() == \
            target.text.strip()
    chat = trl_rows(targets, few_records, conversational=True)
    assert chat[0]["prompt"] == [{"role": "user", "content": few_records[0].prompt}]
    assert chat[0]["completion"] == [{"role": "assistant", "content": targets[0].text}]
    dataset = to_trl_dataset(targets, few_records)
    assert set(dataset.column_names) >= {"prompt", "completion"} and len(dataset) == len(rows)


def test_rows_reject_a_target_of_an_unknown_record(targets, few_records):
    with pytest.raises(ValueError, match="unknown record 'kgfact-0000'"):
        trl_rows(targets, few_records[1:])


def test_cli_trl_format_reads_with_load_dataset_and_the_checked_reader(tmp_path, few_records):
    records_path = tmp_path / "records.jsonl"
    records_path.write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt,
                                                "target": r.target, "answer": r.answer}) + "\n"
                                    for r in few_records[:3]))
    out = tmp_path / "trl.jsonl"
    main(["--records", str(records_path), "--format", "trl", "--out", str(out),
          "--max-new-tokens", "16"])
    native = [MixedTarget.from_json(row) for row in read_jsonl(f"{out}.mixsd.jsonl")]
    assert [json.loads(line) for line in out.read_text().splitlines()] == \
        trl_rows(native, few_records)
    loaded = datasets.load_dataset("json", data_files=str(out), split="train")
    assert loaded.column_names[:2] == ["prompt", "completion"] and len(loaded) == len(native)
    checked = load_trl_dataset(out)
    assert checked["completion"] == loaded["completion"]


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "Where?"}, "missing column 'completion'"),
    ({"completion": " here"}, "missing column 'prompt'"),
    ({"prompt": "Where?", "completion": 3}, "column 'completion' must be"),
    ({"prompt": [{"role": "user", "content": "Where?"}], "completion": " here"},
     "'prompt' is messages but 'completion' is text"),
])
def test_reader_names_file_line_and_column(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "Who?", "completion": " me"}) + "\n"
                    + json.dumps(row) + "\n")
    with pytest.raises(RecordError, match=f"bad.jsonl:2: {message}"):
        load_trl_dataset(path)


def test_sft_trainer_tokenizes_rows_into_forgetkits_mixsd_examples(toyworld, targets,
                                                                    few_records, tmp_path):
    """TRL's own tokenization of the rows gives exactly the sequences and loss mask of
    forgetkit's MixSD trainer (prompt tokens, then the target's tokens with its end token)."""
    trl = pytest.importorskip("trl")
    from forgetkit.train.methods import mixsd_examples

    model, tokenizer = toyworld
    args = trl.SFTConfig(output_dir=str(tmp_path), report_to=[], max_steps=1, use_cpu=True)
    # a copy: the trainer rebinds the model's forward (mixed precision), which would leak into
    # every later test sharing the session's toyworld
    trainer = trl.SFTTrainer(model=copy.deepcopy(model), args=args, processing_class=tokenizer,
                             train_dataset=to_trl_dataset(targets, few_records))
    processed = trainer.train_dataset
    expected = mixsd_examples(tokenizer, few_records, targets)
    assert len(processed) == len(expected)
    for row, example in zip(processed, expected, strict=True):
        assert row["input_ids"] == list(example.encoding.input_ids)
        assert row["labels"] == list(example.encoding.labels)
