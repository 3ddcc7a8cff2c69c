"""The main job end to end: ``python -m forgetkit.fisher`` on the embedded default."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess

import matplotlib.image as mpimg
import numpy as np
import pytest

from forgetkit.fisher.__main__ import main
from forgetkit.fisher.report import REPORT_SECTIONS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    main(["--out", str(out)])  # the default command: toyworld, kgfact, SFT and MixSD
    return out


def test_report_json_has_every_section(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    assert set(REPORT_SECTIONS) <= set(report)
    assert set(report["finetunes"]) == {"SFT", "MixSD lam=0.3"}
    eigenvalues = report["fisher"]["eigenvalues"]
    assert len(eigenvalues) == report["config"]["rank"]
    assert eigenvalues == sorted(eigenvalues, reverse=True)
    for ft in report["finetunes"].values():
        low = ft["projection_low_rank"]
        assert len(low["captured_energy"]) == len(eigenvalues)
        assert all(0 <= e <= 1 for e in low["captured_energy"])
        assert ft["projection_diagonal"]["fisher_displacement"] > 0
        assert ft["measured_kl"]["per_sequence"] > 0
        assert ft["scores"]["memorization"] is not None
        assert ft["retention"]["per_capability"]
        # the headline: the exact d'Fd and the predicted KL, with intervals over probes
        exact = ft["displacement"]
        assert exact["low"] < exact["mean"] < exact["high"]
        assert exact["predicted_kl"] == pytest.approx(exact["mean"] / 2)
        assert len(exact["per_probe"]) == report["base"]["fisher_samples"]
        kl = ft["measured_kl"]
        assert kl["low"] < kl["per_sequence"] < kl["high"]
        # the approximations are named for what they are
        assert not low["predicted_kl_valid"] and "lower bound" in low["label"]
        assert "proxy" in ft["projection_diagonal"]["label"]
        top = ft["low_rank_displacement"]
        assert top["lower_bound"] and top["value"] <= exact["mean"] * (1 + 1e-6)
        assert top["value"] == pytest.approx(low["fisher_displacement"], rel=1e-3)
        assert len(top["seed_values"]) == report["config"]["spread_seeds"]
        # the default top-k directions carry no label noise: 4 seeds agree within 10%
        assert len(top["seed_values"]) == 4 and top["seed_relative_spread"] <= 0.10
        for key in ("memorization_ci", "retention_ci"):
            assert ft[key]["low"] <= ft[key]["value"] <= ft[key]["high"]
        assert [row["t"] for row in ft["kl_path"]] == report["config"]["kl_path"]
    (pair,) = report["comparisons"]
    assert pair["displacement_ratio"]["low"] < pair["displacement_ratio"]["high"]
    assert len(report["risk"]) == report["base"]["records"]


def test_report_html_embeds_valid_pngs(report_dir):
    page = (report_dir / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 7
    for encoded in images:
        data = base64.b64decode(encoded, validate=True)
        assert data.startswith(PNG_SIGNATURE)
        pixels = mpimg.imread(io.BytesIO(data), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 0.01  # something was drawn
    for png in ("fisher_spectrum", "module_fisher_heatmap", "captured_energy",
                "displacement_bars", "predicted_vs_measured_kl", "kl_along_path",
                "retention_vs_memorization"):
        assert (report_dir / f"{png}.png").read_bytes().startswith(PNG_SIGNATURE)


def test_report_screenshot_in_headless_chromium_is_not_blank(report_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium not installed")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
         f"--screenshot={shot}", "--window-size=1200,1600",
         (report_dir / "report.html").as_uri()],
        check=True, capture_output=True, timeout=120)
    pixels = mpimg.imread(shot)
    assert pixels.shape[0] >= 1000
    gray = pixels[..., :3].mean(-1)
    assert gray.std() > 0.05  # text, tables and figures, not an empty page
    assert (gray < 0.5).mean() > 0.005


def test_bad_finetune_architecture_leaves_no_report(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    other = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(
        other)
    from forgetkit.models import load_model

    _, tokenizer = load_model("toyworld", device="cpu")
    tokenizer.save_pretrained(other)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"error: .*different architectures"):
        main(["--finetuned", f"odd={other}", "--out", str(out)])
    assert not (out / "report.html").exists()
    assert not (out / "report.json").exists()


def test_empty_probe_set_is_rejected(tmp_path):
    empty = tmp_path / "probes.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match=r"error: .*probes\.jsonl"):
        main(["--probes", str(empty), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "report.html").exists()


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit, match=r"error: .*NAME=PATH"):
        main(["--finetuned", "nopath"])
    with pytest.raises(SystemExit, match=r"error: .*rank"):
        main(["--rank", "0"])
    with pytest.raises(SystemExit, match=r"error: .*estimator"):
        main(["--estimator", "exact"])


def test_spread_sample_round_robins_capabilities():
    from forgetkit.data.records import Probe
    from forgetkit.fisher.report import spread_sample

    probes = [Probe(f"{c}{i}", "q", "a", c) for c in "abc" for i in range(3)]
    assert [p.id for p in spread_sample(probes, 4)] == ["a0", "b0", "c0", "a1"]
    assert len(spread_sample(probes, 100)) == 9
    np.testing.assert_equal(len({p.id for p in spread_sample(probes, 9)}), 9)


def test_objects_as_well_as_names(toyworld, tmp_path):
    """run_report takes the base, fine-tunes, records and probes as objects; with the same
    fine-tune given as a model or as its folder it computes the same numbers."""
    import copy

    import torch

    from forgetkit.data.records import load_probes, load_records
    from forgetkit.fisher.report import ReportConfig, run_report, spread_sample

    base, tokenizer = toyworld
    finetuned = copy.deepcopy(base)
    with torch.no_grad():
        finetuned.model.layers[0].mlp.down_proj.weight.mul_(1.05)
    finetuned.save_pretrained(tmp_path / "ft")
    tokenizer.save_pretrained(tmp_path / "ft")
    records = load_records("kgfact")[:3]
    probes = spread_sample(load_probes("toyworld"), 8)
    config = dict(rank=2, n_samples=8, params="mlp", device="cpu")
    reports = [run_report(ReportConfig(out=str(tmp_path / name), **config), base=toyworld,
                          finetunes={"ft": ft}, records=records, probes=probes)
               for name, ft in (("model", finetuned), ("path", tmp_path / "ft"))]
    model, path = (r["finetunes"]["ft"] for r in reports)
    assert model["delta_norm"] > 0 and model["delta_norm"] == path["delta_norm"]
    assert model["projection_low_rank"] == path["projection_low_rank"]
    assert reports[0]["base"]["records"] == 3 and reports[0]["base"]["probes"] == 8
    with pytest.raises(ValueError, match="need finetunes"):
        run_report(ReportConfig(out=str(tmp_path / "none"), **config), records=records)


def test_an_output_folder_with_foreign_files_or_a_file_is_refused_before_work(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's")
    with pytest.raises(SystemExit, match=r"error: .*notes\.txt.*replaced whole"):
        main(["--out", str(folder)])
    assert (folder / "notes.txt").read_text() == "the user's"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"error: --out .*file.* is a file"):
        main(["--out", str(tmp_path / "file")])


_KILLED_WRITE = """
import json, os, signal, sys
from pathlib import Path
import forgetkit.files as files
from forgetkit.fisher.render import write_report

report = json.loads(Path(sys.argv[1]).read_text())
report["config"]["seed"] = 12345  # the new report differs from the old one
kill_at, events = int(sys.argv[3]), [0]
def counted(function):
    def wrapper(*args, **kwargs):
        events[0] += 1
        if events[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return wrapper
files.os.rename = counted(os.rename)
Path.write_bytes = counted(Path.write_bytes)
write_report(report, sys.argv[2])
"""


# killed while drawing the figures, before the swap, between its two renames; not killed
@pytest.mark.parametrize("kill_at", [2, 8, 9, 10])
def test_kill_during_report_writing_leaves_the_old_report_or_the_new(report_dir, tmp_path,
                                                                      kill_at):
    import sys

    old = tmp_path / "report"
    # the rewrite below has no Fisher files to attach: the old report has none either
    shutil.copytree(report_dir, old, ignore=shutil.ignore_patterns("finetunes", "fisher_*.json", "fisher_*.safetensors"))
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(report_dir / "report.json"),
                           str(old), str(kill_at)], capture_output=True, text=True, timeout=600)
    assert done.returncode == (0 if kill_at == 10 else -9), done.stderr[-2000:]
    from forgetkit.files import recover_directory

    recover_directory(old)  # what the next run does first
    after = {p.name: p.read_bytes() for p in old.iterdir()}
    assert set(after) == set(before)  # complete: nothing missing, nothing half-written
    if json.loads(after["report.json"])["config"]["seed"] == 12345:
        assert kill_at == 10 and done.returncode == 0  # the new report, whole
    else:
        assert after == before  # the old report, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_report_page_escapes_every_value(report_dir):
    """Names, prompts and config values reach the page as text, never as markup."""
    from forgetkit.fisher.render import FIGURES, render_html

    report = json.loads((report_dir / "report.json").read_text())
    name = "<b>odd</b> & co"
    report["finetunes"] = {name: next(iter(report["finetunes"].values()))}
    report["comparisons"] = []
    report["risk"][0]["prompt"] = "<script>alert(1)</script>"
    report["config"]["base"] = "<i>base</i>"
    images = {key: (report_dir / f"{key}.png").read_bytes() for key in FIGURES}
    page = render_html(report, images)
    assert "<script>" not in page and "<b>odd</b>" not in page and "<i>base</i>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the risk table
    assert page.count("&lt;b&gt;odd&lt;/b&gt; &amp; co") >= 2  # the summary table and reading
    assert "&lt;i&gt;base&lt;/i&gt;" in page
    assert page.count("<table") == 2 and page.count("<figure>") == len(FIGURES)
    report["risk"] = []
    assert "<p>none</p>" in render_html(report, images)


def test_kfac_representation_through_the_interface(toyworld, tmp_path):
    """--representation kfac: the projections, risk and labels come from the EK-FAC Fisher;
    its top-k displacement is not called a lower bound; its own d'Fd is recorded beside the
    exact one with their ratio; the page names the modules on the diagonal fallback."""
    import copy

    import torch

    from forgetkit.data.records import load_probes, load_records
    from forgetkit.fisher.render import summary_rows
    from forgetkit.fisher.report import ReportConfig, run_report, spread_sample

    base = toyworld[0]
    finetuned = copy.deepcopy(base)
    with torch.no_grad():
        finetuned.model.layers[0].mlp.down_proj.weight.mul_(1.05)
        finetuned.model.norm.weight.mul_(1.01)
    out = tmp_path / "kfac"
    config = ReportConfig(out=str(out), representation="kfac", rank=2, n_samples=8,
                          params="mlp|norm", device="cpu", spread_seeds=1, kl_path=[1.0])
    report = run_report(config, base=toyworld, finetunes={"ft": finetuned},
                        records=load_records("kgfact")[:3],
                        probes=spread_sample(load_probes("toyworld"), 8), progress=False)
    fisher = report["fisher"]
    assert fisher["representation"] == "kfac" and "EK-FAC" in fisher["label"]
    assert fisher["low_rank_method"] is None
    # the norms are no linear layer: on the diagonal, and the report says so
    assert fisher["fallback_reasons"] and all("norm" in n for n in fisher["fallback_reasons"])
    assert "model.norm" in fisher["fallback_modules"]
    ft = report["finetunes"]["ft"]
    assert ft["projection_low_rank"]["kind"] == "kfac"
    assert "EK-FAC" in ft["projection_low_rank"]["label"]
    top = ft["low_rank_displacement"]
    assert top["lower_bound"] is False and "not a bound" in top["label"]
    assert top["representation"] == "kfac"
    own = ft["representation_displacement"]
    exact = ft["displacement"]["mean"]
    assert own["exact"] == exact > 0 and own["value"] > 0
    assert own["value"] == pytest.approx(ft["projection_low_rank"]["fisher_displacement"])
    assert own["ratio"] == pytest.approx(own["value"] / exact)
    (row,) = summary_rows(report)
    assert "top-2 Δθ'FΔθ (lower bound)" not in row
    assert "Δθ'FΔθ of Δθ projected on top-2 kfac directions" in row
    assert row["K-FAC / exact"] == f"{own['ratio']:.3g}"
    page = (out / "report.html").read_text()
    assert "diagonal fallback" in page and "<code>model.norm</code>" in page
    assert (out / "fisher_kfac.safetensors").exists() and (out / "fisher_diagonal.json").exists()
    saved = json.loads((out / "report.json").read_text())
    assert saved["finetunes"]["ft"]["representation_displacement"]["ratio"] == own["ratio"]


def test_kfac_without_a_linear_layer_is_refused_before_work(toyworld, tmp_path):
    from forgetkit.fisher.report import ReportConfig, run_report

    config = ReportConfig(out=str(tmp_path / "out"), representation="kfac", params="norm",
                          device="cpu")
    with pytest.raises(ValueError, match=r"--representation kfac: --params 'norm' selects no "
                                         r"linear layer"):
        run_report(config, base=toyworld, finetunes={"ft": "/nonexistent"})
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match=r"error: .*--representation must be one of"):
        main(["--representation", "dense"])
