"""Under torchrun each rank takes a shard of the data; the all-reduced result equals one process.

The worker uses a small pure-torch causal LM, so the two processes start without transformers.
"""

from __future__ import annotations

import importlib.util
import textwrap

import torch

from forgetkit import fisher
from tests.processes import torchrun

WORKER = textwrap.dedent('''
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


    if __name__ == "__main__":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        results = compute(*build(), batch_size=2)
        if dist.get_rank() == 0:
            for name, result in results.items():
                result.save(Path(sys.argv[1]) / name)
        dist.barrier()
        dist.destroy_process_group()
        os._exit(0)  # gloo threads can abort during interpreter teardown (pytorch#179291)
''')


def test_two_gloo_processes_match_one(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    torchrun(str(worker), str(tmp_path))

    spec = importlib.util.spec_from_file_location("fisher_worker", worker)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
