"""Under torchrun each rank takes a shard of the data; the all-reduced result equals one process.

The worker uses a small pure-torch causal LM, so the two processes start without transformers;
one torchrun launch serves every test here.
"""

from __future__ import annotations

import importlib.util
import json
import textwrap

import pytest
import torch

from forgetkit import fisher
from tests.fisher.test_io import assert_relative
from tests.processes import torchrun

WORKER = textwrap.dedent('''
    import json
    import os
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    import torch

    from forgetkit import fisher
    from forgetkit.models import Encoding


    class CausalBag(torch.nn.Module):
        """Token + position embeddings, a causal running mean, one tanh layer, a head."""

        def __init__(self, vocab=20, width=6, positions=12):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, width)
            self.position = torch.nn.Embedding(positions, width)
            self.mix = torch.nn.Linear(width, width)
            self.head = torch.nn.Linear(width, vocab)

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device)
            h = self.embed(input_ids) + self.position(position_ids)  # (B, T, W)
            counts = torch.arange(1, h.shape[-2] + 1, dtype=h.dtype, device=h.device)
            h = torch.tanh(self.mix(h.cumsum(-2) / counts[:, None]))
            return SimpleNamespace(logits=self.head(h))


    def build():
        generator = torch.Generator().manual_seed(0)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = CausalBag().double()
        data = []
        for _ in range(7):  # 7 examples: shards of 4 and 3
            prompt, completion = (int(x) for x in torch.randint(1, 5, (2,), generator=generator))
            ids = torch.randint(1, 20, (prompt + completion,), generator=generator).tolist()
            data.append(Encoding(ids, [-100] * prompt + ids[prompt:], prompt))
        return model, data


    def compute(model, data, batch_size):
        return {
            "diag": fisher.diagonal(model, None, data, mc_samples=2, batch_size=batch_size,
                                    dtype=torch.float64, seed=4),
            "gram": fisher.low_rank(model, None, data, rank=4, estimator="empirical",
                                    method="gram", batch_size=batch_size, dtype=torch.float64),
            "randomized": fisher.low_rank(model, None, data, rank=4, mc_samples=2,
                                          method="randomized", batch_size=batch_size,
                                          dtype=torch.float64, seed=4),
        }


    def compute_kfac(model, data, batch_size):
        """EK-FAC with both estimators: mix and head factored, the embeddings on the diagonal."""
        return {
            "kfac_true": fisher.kfac(model, None, data, mc_samples=2, batch_size=batch_size,
                                     dtype=torch.float64, seed=4),
            "kfac_empirical": fisher.kfac(model, None, data, estimator="empirical",
                                          tokens="all", batch_size=batch_size,
                                          dtype=torch.float64),
        }


    def compute_exact(model, data, batch_size):
        """Label-free Fisher: Lanczos eigenpairs and the displacement of a fixed update."""
        generator = torch.Generator().manual_seed(3)
        update = {name: torch.randn(p.shape, generator=generator, dtype=p.dtype)
                  for name, p in build()[0].named_parameters()}  # the plain model's names
        return {
            "exact": fisher.low_rank(model, None, data, rank=3, method="exact",
                                     batch_size=batch_size),
            "displacement": fisher.displacement(model, None, data, update,
                                                batch_size=batch_size, per_module=True),
        }


    def save(result, path):
        """A Fisher as its two files; a displacement as its JSON."""
        if isinstance(result, fisher.Displacement):
            path.with_suffix(".json").write_text(json.dumps(result.to_dict()))
        else:
            result.save(path)


    def compute_factored(model, data, batch_size):
        """EK-FAC of the linear layers only (no diagonal fallback), with both estimators."""
        return {
            "kfac_linear_true": fisher.kfac(model, None, data, params=["mix", "head"],
                                            mc_samples=2, batch_size=batch_size,
                                            dtype=torch.float64, seed=4),
            "kfac_linear_empirical": fisher.kfac(model, None, data, params=["mix", "head"],
                                                 estimator="empirical", tokens="all",
                                                 batch_size=batch_size, dtype=torch.float64),
        }


    def sharded():
        """The model sharded by FSDP2: each linear layer, then the rest."""
        from torch.distributed.fsdp import fully_shard

        model, _ = build()
        for module in (model.mix, model.head, model):
            fully_shard(module)
        return model


    def fsdp_refusals(model, data):
        """What the diagonal and kfac with its diagonal fallback say of an FSDP-sharded model."""
        messages = {}
        for name, call in (("diagonal", fisher.diagonal), ("kfac", fisher.kfac)):
            try:
                call(model, None, data, dtype=torch.float64)
                messages[name] = ""
            except fisher.FisherError as err:
                messages[name] = str(err)
        return messages


    if __name__ == "__main__":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        model, data = build()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        results = {}
        for compute_all in (compute, compute_kfac, compute_exact):
            results.update(compute_all(model, data, batch_size=2))
            results.update((f"{name}_ddp", result)
                           for name, result in compute_all(ddp, data, batch_size=2).items())
        fsdp = sharded()
        # batches of 3: shards of 4 and 3 examples take 2 and 1 batches (rank 1 idles once)
        results.update((f"{name}_fsdp", result)
                       for name, result in compute_factored(fsdp, data, batch_size=3).items())
        refusals = fsdp_refusals(fsdp, data)
        if dist.get_rank() == 0:
            for name, result in results.items():
                save(result, Path(sys.argv[1]) / name)
            (Path(sys.argv[1]) / "fsdp.json").write_text(json.dumps(refusals))
        dist.barrier()
        dist.destroy_process_group()
        os._exit(0)  # gloo threads can abort during interpreter teardown (pytorch#179291)
''')


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """(folder of the 2-process results, the worker module) after one torchrun launch."""
    folder = tmp_path_factory.mktemp("distributed")
    worker = folder / "worker.py"
    worker.write_text(WORKER)
    torchrun(str(worker), str(folder))
    spec = importlib.util.spec_from_file_location("fisher_worker", worker)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return folder, module


def test_two_gloo_processes_match_one(two_processes):
    tmp_path, module = two_processes
    model, data = module.build()
    single = module.compute(model, data, batch_size=3)
    diag = fisher.load(tmp_path / "diag", model)
    assert diag.provenance.world_size == 2 and diag.n == 7
    for name, value in single["diag"].values.items():
        torch.testing.assert_close(diag.values[name], value, rtol=1e-10, atol=1e-14)
        # a rank that took all the data would double the count and shrink the stderr
        torch.testing.assert_close(diag.stderr[name], single["diag"].stderr[name], rtol=1e-8,
                                   atol=1e-14)
    for kind in ("gram", "randomized"):
        loaded = fisher.load(tmp_path / kind, model)
        torch.testing.assert_close(loaded.eigenvalues, single[kind].eigenvalues, rtol=1e-10,
                                   atol=0)
        for param, u in single[kind].directions.items():  # one sign convention on both sides
            torch.testing.assert_close(loaded.directions[param], u, rtol=1e-8, atol=1e-10)


def test_a_ddp_wrapped_model_gives_the_plain_models_fisher(two_processes):
    """Diagonal, low-rank (every method) and the displacement unwrap DDP: the same parameter
    names (no "module." prefix), provenance and values as the plain model on the same ranks."""
    tmp_path, module = two_processes
    model, data = module.build()
    for kind in ("diag", "gram", "randomized", "exact"):
        plain, ddp = (fisher.load(tmp_path / name, model) for name in (kind, f"{kind}_ddp"))
        assert ddp.shapes == plain.shapes and ddp.provenance == plain.provenance
        if kind == "diag":
            for name, values in plain.values.items():
                assert_relative(ddp.values[name], values, 1e-10)
                assert_relative(ddp.stderr[name], plain.stderr[name], 1e-10)
        else:
            assert_relative(ddp.eigenvalues, plain.eigenvalues, 1e-10)
            for name, u in plain.directions.items():
                assert_relative(ddp.directions[name], u, 1e-10)
    plain, ddp = (json.loads((tmp_path / name).with_suffix(".json").read_text())
                  for name in ("displacement", "displacement_ddp"))
    single = module.compute_exact(model, data, batch_size=3)["displacement"]
    assert list(plain["per_module"]) == ["embed", "position", "mix", "head"]
    for result in (ddp, plain):  # each probe's form on one rank, then all-reduced
        for name, stats in plain["per_module"].items():
            assert result["per_module"][name] == pytest.approx(stats, rel=1e-10)
        values = torch.tensor(list(result["per_probe"].values()), dtype=torch.float64)
        assert_relative(values, torch.from_numpy(single.per_probe), 1e-10)


def test_kfac_on_two_gloo_processes_matches_one_process_plain_and_ddp(two_processes):
    """Factors from each rank's shard, all-reduced before the eigendecompositions, and the
    all-reduced EK-FAC sums give one process's Fisher; a DDP-wrapped model the same; the
    diagonal fallback sees every example once."""
    tmp_path, module = two_processes
    model, data = module.build()
    single = module.compute_kfac(model, data, batch_size=3)
    generator = torch.Generator().manual_seed(2)
    delta = {name: torch.randn(shape, generator=generator, dtype=torch.float64)
             for name, shape in single["kfac_true"].shapes.items()}
    for name, expected in single.items():
        assert list(expected.layers) == ["mix", "head"]
        assert set(expected.fallback_reasons) == {"embed.weight", "position.weight"}
        for saved in (name, f"{name}_ddp"):
            loaded = fisher.load(tmp_path / saved, model)  # DDP's "module." prefix is gone
            assert loaded.provenance.world_size == 2 and loaded.n == 7
            assert loaded.provenance.weights_hash == expected.provenance.weights_hash
            for layer_name, layer in expected.layers.items():
                other = loaded.layers[layer_name]
                assert other.tokens == layer.tokens
                for factor in ("activation_eigenvalues", "gradient_eigenvalues", "eigenvalues"):
                    assert_relative(getattr(other, factor), getattr(layer, factor), 1e-10)
            for param, values in expected.fallback.values.items():
                assert_relative(loaded.fallback.values[param], values, 1e-10)
            assert loaded.quad_form(delta) == pytest.approx(expected.quad_form(delta),
                                                            rel=1e-10, abs=0)


def test_kfac_of_an_fsdp_sharded_model_matches_one_process(two_processes):
    """FSDP2 gathers each layer's weights for its forward and backward, so the hooks see what
    they see on a plain model; the rank with fewer batches idles while the other runs its
    last one; the provenance hashes the gathered weights."""
    tmp_path, module = two_processes
    model, data = module.build()
    single = module.compute_factored(model, data, batch_size=2)
    generator = torch.Generator().manual_seed(2)
    delta = {name: torch.randn(shape, generator=generator, dtype=torch.float64)
             for name, shape in single["kfac_linear_true"].shapes.items()}
    for name, expected in single.items():
        loaded = fisher.load(tmp_path / f"{name}_fsdp", model)
        assert loaded.quad_form(delta) == pytest.approx(expected.quad_form(delta), rel=1e-10,
                                                        abs=0)
        assert loaded.fallback is None and list(loaded.layers) == ["mix", "head"]
        assert loaded.provenance.weights_hash == expected.provenance.weights_hash
        assert loaded.provenance.world_size == 2 and loaded.n == 7
        for layer_name, layer in expected.layers.items():
            other = loaded.layers[layer_name]
            assert other.tokens == layer.tokens
            for factor in ("activation_eigenvalues", "gradient_eigenvalues", "eigenvalues"):
                assert_relative(getattr(other, factor), getattr(layer, factor), 1e-10)


def test_fsdp_is_refused_where_whole_parameters_are_needed(two_processes):
    """The diagonal (per-example gradients of whole parameters) refuses an FSDP-sharded model
    naming the workaround; kfac refuses it when parameters would go to its diagonal fallback."""
    refusals = json.loads((two_processes[0] / "fsdp.json").read_text())
    assert "sharded" in refusals["diagonal"] and "unsharded copy" in refusals["diagonal"]
    assert "diagonal fallback needs whole parameters" in refusals["kfac"]
    assert "embed.weight" in refusals["kfac"] and "linear layers only" in refusals["kfac"]
