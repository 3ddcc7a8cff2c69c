"""Low-rank Fisher against numpy.linalg.eigh of the dense (1/N) G G' on tiny float64 models."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

from forgetkit import fisher
from tests.fisher.test_diagonal import reference_gradients, tiny_data, tiny_model

# parameter subsets of several tensors (orthonormality is joint) that keep P near 600, where a
# dense P x P eigh takes a fraction of a second
SUBSETS = {"llama": ["layers.0.mlp", "embed_tokens"], "gpt2": [r"h\.0\.mlp\.", "*.ln_f.*"]}


def dense_gradients(model, data, pattern):
    """G (P, N): the reference per-example gradients as columns."""
    names = list(fisher.select_parameters(model, pattern))
    grads = reference_gradients(model, data, names)
    return torch.cat([grads[n].flatten(1) for n in names], 1).numpy().T


def dense_eigh(model, data, pattern):
    """Eigenvalues (descending) and eigenvectors (P, P) of the dense (1/N) G G'."""
    G = dense_gradients(model, data, pattern)
    values, vectors = np.linalg.eigh(G @ G.T / len(data))
    return values[::-1], vectors[:, ::-1]


def flat(directions):
    return torch.cat([u.flatten(1) for u in directions.values()], 1).numpy()  # (k, P)


def check_eigenpairs(result, values, vectors, rank, rtol):
    got_values = result.eigenvalues.numpy()
    np.testing.assert_allclose(got_values, values[:rank], rtol=rtol)
    U = flat(result.directions)
    np.testing.assert_allclose(U @ U.T, np.eye(rank), atol=1e-12)  # jointly orthonormal
    cosines = np.linalg.svd(U @ vectors[:, :rank], compute_uv=False)  # principal angles
    assert cosines.min() > 1 - rtol, cosines
    assert np.all(np.diff(got_values) <= 0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gram_and_randomized_match_dense_eigh(arch):
    model, data, rank = tiny_model(arch, seed=1), tiny_data(8, seed=1), 4
    values, vectors = dense_eigh(model, data, SUBSETS[arch])
    assert values[rank - 1] > 1.05 * values[rank]  # a spectral gap: the subspace is defined
    for method in ("gram", "randomized"):  # randomized: l = 4 + 10 >= N, so Y spans range(F)
        result = fisher.low_rank(model, None, data, rank=rank, estimator="empirical",
                                 params=SUBSETS[arch], method=method, batch_size=3,
                                 dtype=torch.float64)
        assert result.method == method
        assert all(".mlp." in n or "embed" in n or "ln_f" in n for n in result.directions)
        check_eigenpairs(result, values, vectors, rank, rtol=1e-8)


def test_randomized_with_fewer_sketch_columns_than_examples():
    """l = 3 + 10 < N = 40 on a slowly decaying spectrum (lambda_4 / lambda_3 ~ 0.9): two power
    iterations give about 1e-4 (measured 7e-5); 1e-3 is the tolerance we can honestly state."""
    model, data, rank = tiny_model("llama", seed=3), tiny_data(40, seed=3), 3
    values, vectors = dense_eigh(model, data, SUBSETS["llama"])
    result = fisher.low_rank(model, None, data, rank=rank, estimator="empirical",
                             params=SUBSETS["llama"], method="randomized", oversample=10,
                             power_iterations=2, batch_size=20, dtype=torch.float64)
    check_eigenpairs(result, values, vectors, rank, rtol=1e-3)
    assert result.sketch == 13 and result.power_iterations == 2


def test_true_fisher_full_rank_reconstructs_the_diagonal_with_the_same_draws():
    model, data = tiny_model("gpt2", seed=2), tiny_data(4, seed=2)
    draws = 3
    full = fisher.low_rank(model, None, data, rank=len(data) * draws, mc_samples=draws,
                           method="gram", dtype=torch.float64, seed=5)
    diag = fisher.diagonal(model, None, data, mc_samples=draws, dtype=torch.float64, seed=5)
    for name, u in full.directions.items():
        reconstructed = torch.einsum("k,k...->...", full.eigenvalues, u.square())
        torch.testing.assert_close(reconstructed, diag.values[name], rtol=1e-9, atol=1e-12)
    randomized = fisher.low_rank(model, None, data, rank=5, mc_samples=draws,
                                 method="randomized", dtype=torch.float64, seed=5)
    np.testing.assert_allclose(randomized.eigenvalues, full.eigenvalues[:5], rtol=1e-9)


def test_quad_form_equals_mean_squared_projection_of_the_gradients():
    model, data = tiny_model("llama", seed=4), tiny_data(5, seed=4)
    pattern = SUBSETS["llama"]
    G = dense_gradients(model, data, pattern)
    result = fisher.low_rank(model, None, data, rank=5, estimator="empirical", params=pattern,
                             dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    delta = {n: torch.randn(u.shape[1:], generator=generator, dtype=torch.float64)
             for n, u in result.directions.items()}
    d = torch.cat([v.flatten() for v in delta.values()]).numpy()
    expected = float(np.mean((G.T @ d) ** 2))  # d' F d with F = (1/N) G G', full rank here
    assert result.quad_form(delta) == pytest.approx(expected, rel=1e-9)


def test_repeated_examples_give_zero_eigenvalues_and_an_orthonormal_completion(caplog):
    model, data = tiny_model("gpt2", seed=5), tiny_data(2, seed=5)
    with caplog.at_level(logging.WARNING):
        result = fisher.low_rank(model, None, data * 3, rank=4, estimator="empirical",
                                 method="gram", dtype=torch.float64)
    assert "only 2 of 4 eigenvalues are nonzero" in caplog.text
    assert result.eigenvalues[2:].abs().max() == 0 and result.eigenvalues[1] > 0
    U = flat(result.directions)
    np.testing.assert_allclose(U @ U.T, np.eye(4), atol=1e-10)


def test_auto_picks_randomized_when_the_gradients_do_not_fit():
    model, data = tiny_model("gpt2", seed=6), tiny_data(4, seed=6)
    small = fisher.low_rank(model, None, data, rank=2, estimator="empirical", params="mlp")
    big = fisher.low_rank(model, None, data, rank=2, estimator="empirical", params="mlp",
                          gram_max_bytes=0)
    assert (small.method, big.method) == ("gram", "randomized")
    np.testing.assert_allclose(big.eigenvalues, small.eigenvalues, rtol=1e-4)


def test_bad_rank_and_method():
    model, data = tiny_model("llama", seed=7), tiny_data(3, seed=7)
    with pytest.raises(fisher.FisherError, match="rank=4 must be between 1 and"):
        fisher.low_rank(model, None, data, rank=4, estimator="empirical")
    with pytest.raises(fisher.FisherError, match="rank=0"):
        fisher.low_rank(model, None, data, rank=0)
    with pytest.raises(fisher.FisherError, match="method"):
        fisher.low_rank(model, None, data, rank=2, method="lanczos")
    with pytest.raises(fisher.FisherError, match="oversample"):
        fisher.low_rank(model, None, data, rank=2, oversample=-1)


@pytest.mark.parametrize(("rows", "width"), [(50, 5), (9, 5), (15, 7), (6, 6)])
def test_sliced_orthonormalization_spans_the_columns(monkeypatch, rows, width):
    low_rank_module = sys.modules["forgetkit.fisher.low_rank"]
    monkeypatch.setattr(low_rank_module, "_CHUNK", 7)  # several slices, a short last one
    y = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows),
                    dtype=torch.float64)
    q = low_rank_module._orthonormalize_(y.clone())
    torch.testing.assert_close(q.T @ q, torch.eye(width, dtype=torch.float64))
    torch.testing.assert_close(q @ (q.T @ y), y)  # same column space


def test_randomized_in_slices_matches_gram(monkeypatch):
    monkeypatch.setattr(sys.modules["forgetkit.fisher.low_rank"], "_CHUNK", 100)
    model, data = tiny_model("gpt2", seed=9), tiny_data(6, seed=9)
    gram = fisher.low_rank(model, None, data, rank=3, estimator="empirical", method="gram",
                           dtype=torch.float64)
    sliced = fisher.low_rank(model, None, data, rank=3, estimator="empirical",
                             method="randomized", dtype=torch.float64)
    np.testing.assert_allclose(sliced.eigenvalues, gram.eigenvalues, rtol=1e-9)
    for name, u in gram.directions.items():
        torch.testing.assert_close(sliced.directions[name], u, rtol=1e-7, atol=1e-9)
