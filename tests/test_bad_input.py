"""Bad input to every command line ends in one ``error: ...`` line naming the file, line, field
or flag, exit status 2 and no traceback, before any long step; ``--debug`` (or
``FORGETKIT_DEBUG=1``) shows the traceback instead. tests/README.md tables the input classes.

Each command runs in its own process: a fork of one server that imported forgetkit once
(tests/cli_runner.py), so the ~70 commands cost seconds rather than ~70 torch imports; a few
tests at the end run the real ``python -m`` entry points as well.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOYWORLD = ROOT / "forgetkit" / "models" / "toyworld_model"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                  os.environ.get("PYTHONPATH")])),
       "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "agg",
       "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("FORGETKIT_DEBUG", None)

RECORD = {"id": "r1", "prompt": "where does ada live ?", "target": "ada lives in paris .",
          "answer": "paris"}


def _files(tmp: Path) -> None:
    """Every bad input the cases below name, written once."""
    good = json.dumps(RECORD)
    (tmp / "nonutf.jsonl").write_bytes(good.encode() + b'\n{"id": "r2", "prompt": "caf\xe9"}\n')
    (tmp / "deep.jsonl").write_text('{"id": ' + "[" * 100_000 + "\n")
    (tmp / "deeparray.json").write_text("[" * 100_000 + "\n")
    (tmp / "deep40.jsonl").write_text(json.dumps({**RECORD, "meta": {"x": [[[[[[[[[[[[[[
        [[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}) + "\n")
    (tmp / "longline.jsonl").write_text(json.dumps({**RECORD, "prompt": "a " * 600_000}) + "\n")
    (tmp / "malformed.jsonl").write_text(good + "\n{\"id\": \"r2\", \"prompt\": \n")
    (tmp / "notobject.jsonl").write_text("[1, 2]\n")
    (tmp / "missingfield.jsonl").write_text(json.dumps({"id": "r1", "prompt": "x ?",
                                                        "target": "y ."}) + "\n")
    (tmp / "duplicate.jsonl").write_text(good + "\n" + good + "\n")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "unknownformat.jsonl").write_text(json.dumps({"question_text": "x"}) + "\n")
    (tmp / "longprompt.jsonl").write_text(json.dumps(
        {**RECORD, "prompt": "where does ada live ? " * 400}) + "\n")
    (tmp / "bad.yaml").write_text("learning_rate: [1, 2\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "unknown.yaml").write_text("learning_rte: 0.1\n")
    (tmp / "afile").write_text("x")
    (tmp / "adir").mkdir()
    (tmp / "notamodel").mkdir()
    (tmp / "notamodel" / "readme.txt").write_text("x")
    truncated = tmp / "truncated_model"
    shutil.copytree(TOYWORLD, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    garbage = tmp / "garbage_model"
    shutil.copytree(TOYWORLD, garbage)
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    (tmp / "badconfig_model").mkdir()
    (tmp / "badconfig_model" / "config.json").write_text("{not json")


T = "{tmp}"  # replaced by the folder of _files
TRAIN, MIXSD, NLL, FISHER, TOY = ("forgetkit.train", "forgetkit.mixsd", "forgetkit.nll",
                                  "forgetkit.fisher", "forgetkit.toyworld")
PARETO, FISHER_STUDY, NLL_STUDY = ("experiments/pareto.py", "experiments/fisher_study.py",
                                   "experiments/nll_study.py")
OUT = ["--output_dir", f"{T}/run"]

# (command, arguments, regex the error line must match: the file/line/field/flag it names)
CASES = [
    # records and probes files
    (TRAIN, [*OUT, "--records", f"{T}/nonutf.jsonl"], r"nonutf\.jsonl:2: not UTF-8 .*0xe9"),
    (TRAIN, [*OUT, "--records", f"{T}/deep.jsonl"], r"deep\.jsonl:1: JSON nested deeper than 32"),
    (TRAIN, [*OUT, "--records", f"{T}/deeparray.json"], r"deeparray\.json: JSON nested deeper"),
    (TRAIN, [*OUT, "--records", f"{T}/deep40.jsonl"], r"deep40\.jsonl:1: JSON nested deeper"),
    (TRAIN, [*OUT, "--records", f"{T}/longline.jsonl"], r"longline\.jsonl:1: line of .* over the "
                                                        r"limit of 1,000,000"),
    (TRAIN, [*OUT, "--records", f"{T}/malformed.jsonl"], r"malformed\.jsonl:2: malformed JSON"),
    (TRAIN, [*OUT, "--records", f"{T}/notobject.jsonl"], r"notobject\.jsonl:1: expected a JSON "
                                                         r"object"),
    (TRAIN, [*OUT, "--records", f"{T}/missingfield.jsonl"], r"missingfield\.jsonl"),
    (TRAIN, [*OUT, "--records", f"{T}/duplicate.jsonl"], r"duplicate\.jsonl:2: field 'id': "
                                                         r"duplicate id 'r1'"),
    (TRAIN, [*OUT, "--records", f"{T}/empty.jsonl"], r"empty\.jsonl: empty file"),
    (TRAIN, [*OUT, "--records", f"{T}/unknownformat.jsonl"], r"unknownformat\.jsonl:1: unknown "
                                                             r"format"),
    (TRAIN, [*OUT, "--records", f"{T}/missing.jsonl"], r"missing\.jsonl: no such file"),
    (TRAIN, [*OUT, "--records", f"{T}/adir"], r"adir: no such file"),
    (TRAIN, [*OUT, "--probes", f"{T}/missing.jsonl"], r"missing\.jsonl: no such file"),
    (TRAIN, [*OUT, "--records", f"{T}/longprompt.jsonl"], r"record 'r1' \(.*longprompt\.jsonl:1\)"
                                                          r": prompt \+ completion is \d+ tokens, "
                                                          r"longer than the model's context "
                                                          r"\(1024"),
    (TRAIN, [*OUT, "--records", f"{T}/longprompt.jsonl", "--method", "opsd"],
     r"record 'r1' .*: the expert prompt is \d+ tokens"),
    # options
    (TRAIN, [*OUT, "--learning_rate", "-1"], r"learning_rate=-1\.0 must be > 0"),
    (TRAIN, [*OUT, "--learning_rate", "nan"], r"learning_rate=nan must be > 0"),
    (TRAIN, [*OUT, "--max_steps", "-5", "--num_train_epochs", "0"], r"set max_steps > 0"),
    (TRAIN, [*OUT, "--per_device_train_batch_size", "0"], r"per_device_train_batch_size=0"),
    (TRAIN, [*OUT, "--save_total_limit", "0"], r"save_total_limit=0"),
    (TRAIN, [*OUT, "--method", "replay", "--replay_ratio", "1.5"], r"replay_ratio=1\.5"),
    (TRAIN, [*OUT, "--stop_at_memorization", "2", "--eval_steps", "5"], r"stop_at_memorization"),
    (TRAIN, [*OUT, "--fisher_path", f"{T}/f"], r"fisher_path applies to ewc and "
                                               r"fisher_orthogonal"),
    (TRAIN, [*OUT, "--method", "dpo"], r"--method.*dpo"),
    (TRAIN, [*OUT, "--max_steps", "ten"], r"--max_steps.*ten"),
    (TRAIN, [*OUT, "--lerning_rate", "0.1"], r"unknown option --lerning_rate .*--learning_rate"),
    (TRAIN, [*OUT, "--lam", "2"], r"lam"),
    (TRAIN, [*OUT, "--dtype", "float8"], r"unknown dtype 'float8'"),
    (TRAIN, [*OUT, "--device", "cuda"], r"device 'cuda': (this torch build has no CUDA|no CUDA "
                                        r"device)"),
    (TRAIN, [*OUT, "--device", "gpu0"], r"device 'gpu0' is not a device torch knows"),
    (TRAIN, [*OUT, "--config", f"{T}/bad.yaml"], r"bad\.yaml: not valid YAML"),
    (TRAIN, [*OUT, "--config", f"{T}/list.yaml"], r"list\.yaml: expected a mapping"),
    (TRAIN, [*OUT, "--config", f"{T}/unknown.yaml"], r"unknown\.yaml: unknown config key "
                                                     r"'learning_rte'"),
    (TRAIN, [*OUT, "--config", f"{T}/nothing.yaml"], r"cannot read config file .*nothing\.yaml"),
    # outputs and models
    (TRAIN, ["--output_dir", f"{T}/afile"], r"output_dir .*afile is a file, not a folder"),
    (TRAIN, ["--output_dir", f"{T}/afile/run"], r"output_dir .*afile is a file, not a folder"),
    (TRAIN, [*OUT, "--model_name_or_path", "no-such-model"], r"no model 'no-such-model'"),
    (TRAIN, [*OUT, "--model_name_or_path", f"{T}/notamodel"], r"notamodel exists but is neither"),
    (TRAIN, [*OUT, "--model_name_or_path", f"{T}/truncated_model"],
     r"truncated_model/model\.safetensors: cannot load the model"),
    (TRAIN, [*OUT, "--model_name_or_path", f"{T}/garbage_model"],
     r"garbage_model/model\.safetensors: cannot load the model"),
    (TRAIN, [*OUT, "--model_name_or_path", f"{T}/badconfig_model"],
     r"badconfig_model: cannot load the model"),
    # MixSD
    (MIXSD, ["--records", f"{T}/nonutf.jsonl"], r"nonutf\.jsonl:2: not UTF-8"),
    (MIXSD, ["--records", f"{T}/missing.jsonl"], r"missing\.jsonl: no such file"),
    (MIXSD, ["--out", f"{T}/afile/targets.jsonl"], r"--out .*afile is a file, not a folder"),
    (MIXSD, ["--out", f"{T}/adir"], r"--out .*adir is a folder, not a file"),
    (MIXSD, ["--lam", "-1"], r"lam"),
    (MIXSD, ["--top_k", "0"], r"top_k"),
    (MIXSD, ["--max_new_tokens", "0"], r"max_new_tokens"),
    (MIXSD, ["--format", "csv"], r"format"),
    (MIXSD, ["--device", "cuda"], r"device 'cuda'"),
    (MIXSD, ["--model", f"{T}/truncated_model", "--out", f"{T}/t.jsonl"],
     r"truncated_model/model\.safetensors"),
    (MIXSD, ["--records", f"{T}/longprompt.jsonl", "--out", f"{T}/t.jsonl"],
     r"record 'r1' .*longprompt\.jsonl:1.*longer than the model's context"),
    # NLL
    (NLL, ["--out", f"{T}/afile"], r"--out .*afile is a file, not a folder"),
    (NLL, ["--records", f"{T}/deep.jsonl"], r"deep\.jsonl:1: JSON nested deeper"),
    (NLL, ["--records", f"{T}/missing.jsonl", "--out", f"{T}/nll"], r"missing\.jsonl: no such"),
    (NLL, ["--lam", "2"], r"lam=\[2\.0\]"),
    (NLL, ["--n_boot", "0"], r"n_boot=0"),
    (NLL, ["--limit", "0"], r"limit=0"),
    (NLL, ["--batch_size", "0"], r"batch_size=0"),
    (NLL, ["--padding_side", "up"], r"padding_side"),
    (NLL, ["--device", "cuda"], r"device 'cuda'"),
    (NLL, ["--model", f"{T}/truncated_model", "--out", f"{T}/nll"],
     r"truncated_model/model\.safetensors"),
    (NLL, ["--records", f"{T}/longprompt.jsonl", "--out", f"{T}/nll"],
     r"items\[0\] \('r1'\): prompt \+ completion is \d+ tokens"),
    # Fisher report
    (FISHER, ["--params", "(mlp"], r"--params '\(mlp' is not a valid regular expression"),
    (FISHER, ["--mc_samples", "0"], r"--mc_samples must be >= 1"),
    (FISHER, ["--rank", "0"], r"--rank must be >= 1"),
    (FISHER, ["--train_steps", "-5"], r"--train_steps must be >= 1"),
    (FISHER, ["--learning_rate", "0"], r"--learning_rate must be a number > 0"),
    (FISHER, ["--estimator", "exact"], r"--estimator"),
    (FISHER, ["--low_rank_method", "magic"], r"--low_rank_method"),
    (FISHER, ["--kl_path", "2"], r"--kl_path"),
    (FISHER, ["--n_samples", "0"], r"n-samples|n_samples"),
    (FISHER, ["--finetuned", "nopath"], r"--finetuned expects NAME=PATH"),
    (FISHER, ["--device", "cuda"], r"--dtype/--device: device 'cuda'"),
    (FISHER, ["--out", f"{T}/afile"], r"--out .*afile is a file"),
    (FISHER, ["--out", f"{T}/r1", "--records", f"{T}/nonutf.jsonl",
              "--finetuned", f"a={TOYWORLD}"], r"nonutf\.jsonl:2: not UTF-8"),
    (FISHER, ["--out", f"{T}/r2", "--probes", f"{T}/empty.jsonl", "--finetuned", f"a={TOYWORLD}"],
     r"empty\.jsonl: empty file"),
    (FISHER, ["--out", f"{T}/r3", "--finetuned", f"a={T}/nosuchdir"], r"nosuchdir"),
    (FISHER, ["--out", f"{T}/r4", "--finetuned", f"a={T}/truncated_model"],
     r"truncated_model/model\.safetensors"),
    # the memory plan refuses a representation the device cannot hold (about 200 GB of
    # Lanczos vectors for 8192 exact directions of toyworld) before any Fisher work
    (FISHER, ["--out", f"{T}/r6", "--finetuned", f"a={TOYWORLD}", "--rank", "8192",
              "--mc_samples", "128", "--n_samples", "64"],
     r"--representation low_rank needs about .* GiB above the model .* the device has"),
    (FISHER, ["--out", f"{T}/r5", "--base", f"{T}/garbage_model"],
     r"garbage_model/model\.safetensors"),
    # toyworld and the experiment scripts
    (TOY, ["--steps", "0"], r"--steps must be >= 1"),
    (TOY, ["--seed", "abc"], r"--seed.*abc"),
    (PARETO, ["--bogus", "1"], r"unknown option --bogus"),
    (PARETO, ["--config", f"{T}/bad.yaml"], r"bad\.yaml: not valid YAML"),
    (PARETO, ["--rescore_probes", "kgfact-large:retrieval"],
     r"rescore_probes needs rescore_probes_per_capability"),
    (PARETO, ["--rescore_probes", "kgfact-large:nope", "--rescore_probes_per_capability", "4",
              "--out", f"{T}/p1", "--cache", f"{T}/pc1"],
     r"kgfact-large:nope: probe set 'kgfact-large' has no capability 'nope'"),
    (FISHER_STUDY, ["--pareto", f"{T}/adir", "--out", f"{T}/fs"], r"adir"),
    (FISHER_STUDY, ["--representation", "dense", "--out", f"{T}/fs"],
     r"representation='dense' must be low_rank or kfac"),
    (NLL_STUDY, ["--config", f"{T}/list.yaml"], r"list\.yaml: expected a mapping"),
]


def _case_id(case) -> str:
    command, args, _ = case
    name = Path(command).stem if command.endswith(".py") else command.rsplit(".", 1)[-1]
    return f"{name}:{' '.join(args[2:] if args[:1] == ['--output_dir'] else args)[:50]}"


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad_input")
    _files(tmp)
    return tmp


@pytest.fixture(scope="module")
def run_cli():
    """``run_cli(command, args, cwd)`` -> ``{"rc", "stdout", "stderr"}``, each command in its own
    forked process (tests/cli_runner.py)."""
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "cli_runner.py")],
                              cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert json.loads(server.stdout.readline()) == {"ready": True}

    def run(command: str, args: list[str], cwd: Path, timeout: int = 180) -> dict:
        key = "script" if command.endswith(".py") else "module"
        target = str(ROOT / command) if key == "script" else command
        server.stdin.write(json.dumps({key: target, "argv": args, "cwd": str(cwd),
                                       "timeout": timeout}) + "\n")
        server.stdin.flush()
        return json.loads(server.stdout.readline())

    yield run
    server.stdin.close()
    server.wait(timeout=30)


def _check_one_error_line(result: dict, pattern: str) -> str:
    stderr = result["stderr"]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert result["rc"] == 2, (result["rc"], stderr[-3000:])
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bad_input_is_one_error_line_naming_it(case, bad_files, run_cli):
    command, args, pattern = case
    args = [a.replace(T, str(bad_files)) for a in args]
    result = run_cli(command, args, cwd=bad_files)
    _check_one_error_line(result, pattern.replace(T, str(bad_files)))


def test_diverged_training_keeps_its_last_good_checkpoint(bad_files, run_cli):
    out = bad_files / "diverged"
    result = run_cli(TRAIN, ["--output_dir", str(out), "--learning_rate", "1e30", "--max_steps",
                             "4", "--do_eval", "false", "--warmup_steps", "0",
                             "--max_grad_norm", "0", "--save_steps", "1"], cwd=bad_files)
    line = _check_one_error_line(result, r"step (\d): the loss is")
    failed = int(line.split("step ")[1].split(":")[0])
    assert failed >= 2 and (out / f"checkpoint-{failed - 1}").is_dir()
    assert not (out / f"checkpoint-{failed}").exists() and not (out / "results.json").exists()


def test_debug_flag_and_variable_show_the_traceback(bad_files, run_cli):
    for args, env in ((["--mc_samples", "0", "--debug"], {}),
                      (["--mc_samples", "0"], {"FORGETKIT_DEBUG": "1"})):
        result = run_cli(FISHER, args, cwd=bad_files) if not env else None
        if env:  # the environment variable: a real process with that environment
            result = _python(["-m", FISHER, *args], bad_files, env)
        assert result["rc"] == 1 and "Traceback" in result["stderr"], result["stderr"][-2000:]
        assert "ValueError: --mc_samples must be >= 1" in result["stderr"]


def _python(args: list[str], cwd: Path, env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, *args], cwd=cwd, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=300)
    return {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


@pytest.mark.parametrize(("command", "args", "pattern"), [
    (TRAIN, ["--records", "{tmp}/nonutf.jsonl", "--output_dir", "{tmp}/real_run"],
     r"nonutf\.jsonl:2: not UTF-8"),
    (NLL, ["--params_typo", "1"], r"unknown option --params_typo"),
])
def test_the_real_entry_points(command, args, pattern, bad_files):
    args = [a.replace(T, str(bad_files)) for a in args]
    _check_one_error_line(_python(["-m", command, *args], bad_files), pattern)
