"""The closed-form merges against an independent reference: least squares on the stacked client data (numpy).

A shrunk Gram alpha X^T X + (1 - alpha) diag(X^T X) is the Gram of the augmented data
[sqrt(alpha) X ; diag(sqrt((1 - alpha) * colsum(X^2)))], so every merge is the minimum-norm least-squares fit
of the stacked augmented activations to the stacked client outputs, which numpy.linalg.lstsq computes without
any of the code under test.
"""

import numpy as np
import pytest
import torch

from common.grams import shrink
from common.merges import (
    MergeError,
    RoundSums,
    TaskSums,
    head_from_sums,
    merge_round,
    solve_layers,
    solve_regmean,
)

RTOL = 1e-8


def augmented(X: np.ndarray, alpha: float) -> np.ndarray:
    """Rows whose Gram is the alpha-shrunk Gram of X."""
    energy = np.sqrt((1 - alpha) * (X**2).sum(0))
    return np.vstack([np.sqrt(alpha) * X, np.diag(energy)])


def gram(X: np.ndarray, alpha: float) -> torch.Tensor:
    """The statistic a client sends: (d,) diagonal when alpha == 0, else the dense shrunk Gram."""
    return shrink(torch.from_numpy(X.T @ X), alpha)


def lstsq_fit(Xs: list[np.ndarray], Ys: list[np.ndarray]) -> np.ndarray:
    """argmin_W sum_i ||X_i W^T - Y_i||^2 (minimum norm): W (m, d)."""
    return np.linalg.lstsq(np.vstack(Xs), np.vstack(Ys), rcond=None)[0].T


def close(got: torch.Tensor, want: np.ndarray, rtol: float = RTOL) -> None:
    err = np.abs(got.double().cpu().numpy() - want).max() / max(np.abs(want).max(), 1e-300)
    assert err < rtol, f"relative error {err:.2e}"


def clients(rng, K=4, n=40, d=10, zero_features=()):
    Xs = [rng.standard_normal((n + 7 * i, d)) * rng.uniform(0.5, 2.0, d) for i in range(K)]
    for X in Xs:
        X[:, list(zero_features)] = 0.0
    return Xs


LAYERS = {"qkv": (18, 10), "proj": (10, 10), "fc2": (10, 14)}  # name -> (d_out, d_in), two share d_in = 10


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_a_round_is_least_squares_on_stacked_data(alpha):
    rng = np.random.default_rng(0)
    K, r = 4, 3
    Xs = {name: clients(rng, K, d=d_in) for name, (_, d_in) in LAYERS.items()}
    As = [{name: rng.standard_normal((r, d_in)) for name, (_, d_in) in LAYERS.items()} for _ in range(K)]
    B = {name: torch.from_numpy(rng.standard_normal((d_out, r))) for name, (d_out, _) in LAYERS.items()}
    grams = [{name: gram(Xs[name][i], alpha) for name in LAYERS} for i in range(K)]
    trained = [{k: torch.from_numpy(v) for k, v in a.items()} for a in As]
    merged = merge_round("A", B, trained, grams)
    for name in LAYERS:
        Xa = [augmented(X, alpha) for X in Xs[name]]
        close(merged[name], lstsq_fit(Xa, [X @ a[name].T for X, a in zip(Xa, As)]))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_b_round_is_least_squares_on_stacked_data(alpha):
    rng = np.random.default_rng(1)
    K, r = 5, 4
    Xs = {name: clients(rng, K, d=d_in) for name, (_, d_in) in LAYERS.items()}
    A = {name: rng.standard_normal((r, d_in)) for name, (_, d_in) in LAYERS.items()}
    Bs = [{name: rng.standard_normal((d_out, r)) for name, (d_out, _) in LAYERS.items()} for _ in range(K)]
    grams = [{name: gram(Xs[name][i], alpha) for name in LAYERS} for i in range(K)]
    merged = merge_round(
        "B", {k: torch.from_numpy(v) for k, v in A.items()}, [{k: torch.from_numpy(v) for k, v in b.items()}
                                                             for b in Bs], grams
    )
    for name in LAYERS:
        Zs = [augmented(X, alpha) @ A[name].T for X in Xs[name]]  # the r-dimensional inputs of B
        close(merged[name], lstsq_fit(Zs, [Z @ b[name].T for Z, b in zip(Zs, Bs)]))


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_unseen_features_give_the_minimum_norm_solution_without_nans(alpha):
    """Features 2 and 7 are zero on every client (zero Gram diagonal): pinv semantics, no NaN."""
    rng = np.random.default_rng(2)
    d, r, K = 9, 3, 3
    Xs = clients(rng, K, d=d, zero_features=(2, 7))
    As = [rng.standard_normal((r, d)) for _ in range(K)]
    merged = merge_round(
        "A", {"l": torch.zeros(5, r)}, [{"l": torch.from_numpy(a)} for a in As], [{"l": gram(X, alpha)} for X in Xs]
    )["l"]
    assert torch.isfinite(merged).all()
    assert (merged[:, [2, 7]] == 0).all()
    Xa = [augmented(X, alpha) for X in Xs]
    close(merged, lstsq_fit(Xa, [X @ a.T for X, a in zip(Xa, As)]))


def test_singular_dense_gram_falls_back_to_the_pseudo_inverse(caplog):
    """alpha = 1 with fewer rows than features: the system is singular; the result is still the min-norm fit."""
    rng = np.random.default_rng(3)
    d, r = 12, 2
    Xs = [rng.standard_normal((4, d)) for _ in range(2)]  # rank 8 < 12
    As = [rng.standard_normal((r, d)) for _ in range(2)]
    merged = merge_round(
        "A", {"l": torch.zeros(3, r)}, [{"l": torch.from_numpy(a)} for a in As], [{"l": gram(X, 1.0)} for X in Xs]
    )["l"]
    close(merged, lstsq_fit(Xs, [X @ a.T for X, a in zip(Xs, As)]), rtol=1e-6)
    assert "pseudo-inverse" in caplog.text


@pytest.mark.parametrize("dense", [False, True])
def test_ridge_is_tikhonov_in_the_scale_of_the_mean_diagonal(dense):
    rng = np.random.default_rng(4)
    d, ridge = 6, 0.3
    X = rng.standard_normal((30, d))
    G = X.T @ X if dense else (X**2).sum(0)
    num = rng.standard_normal((4, d))
    lam = ridge * (np.diag(G) if dense else G).mean()
    want = num @ np.linalg.inv((G if dense else np.diag(G)) + lam * np.eye(d))
    close(solve_regmean(torch.from_numpy(num), torch.from_numpy(G), ridge), want)


@pytest.mark.parametrize("factor", ["A", "B"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_one_client_is_the_identity_and_order_does_not_matter(factor, alpha):
    rng = np.random.default_rng(5)
    K, r, d_out, d_in = 4, 3, 7, 8
    shared = {"l": torch.from_numpy(rng.standard_normal((r, d_in) if factor == "B" else (d_out, r)))}
    shape = (r, d_in) if factor == "A" else (d_out, r)
    trained = [{"l": torch.from_numpy(rng.standard_normal(shape))} for _ in range(K)]
    grams = [{"l": gram(X, alpha)} for X in clients(rng, K, d=d_in)]
    close(merge_round(factor, shared, trained[:1], grams[:1])["l"], trained[0]["l"].numpy())
    forward = merge_round(factor, shared, trained, grams)["l"]
    order = [2, 0, 3, 1]
    backward = merge_round(factor, shared, [trained[i] for i in order], [grams[i] for i in order])["l"]
    close(backward, forward.numpy(), rtol=1e-12)


@pytest.mark.parametrize("factor", ["A", "B"])
def test_a_client_with_zero_samples_contributes_nothing(factor):
    rng = np.random.default_rng(6)
    r, d_out, d_in = 2, 5, 6
    shared = {"l": torch.from_numpy(rng.standard_normal((r, d_in) if factor == "B" else (d_out, r)))}
    shape = (r, d_in) if factor == "A" else (d_out, r)
    trained = [{"l": torch.from_numpy(rng.standard_normal(shape))} for _ in range(3)]
    grams = [{"l": gram(X, 0.5)} for X in clients(rng, 2, d=d_in)] + [{"l": torch.zeros(d_in, d_in)}]
    with_empty = merge_round(factor, shared, trained, grams)["l"]
    close(with_empty, merge_round(factor, shared, trained[:2], grams[:2])["l"].numpy(), rtol=1e-12)


def test_clients_that_agree_get_their_adapter_back():
    rng = np.random.default_rng(7)
    r, d_out, d_in = 3, 6, 8
    A, B = (torch.from_numpy(rng.standard_normal(s)) for s in ((r, d_in), (d_out, r)))
    grams = [{"l": gram(X, a)} for X, a in zip(clients(rng, 3, d=d_in), (0.0, 0.0, 0.0))]
    close(merge_round("B", {"l": A}, [{"l": B}] * 3, grams)["l"], B.numpy())
    close(merge_round("A", {"l": B}, [{"l": A}] * 3, grams)["l"], A.numpy())


def test_task_sums_are_regmean_over_task_deltas():
    rng = np.random.default_rng(9)
    d_out, d_in, r = 6, 7, 2
    Xs = clients(rng, 3, d=d_in)  # one data set per task (summed over clients)
    adapters = [(rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))) for _ in Xs]
    for alpha in (0.0, 0.5):
        sums = TaskSums()
        for X, (A, B) in zip(Xs, adapters):
            sums.fold({"l": torch.from_numpy(A)}, {"l": torch.from_numpy(B)}, {"l": gram(X, alpha)})
        Xa = [augmented(X, alpha) for X in Xs]
        want = lstsq_fit(Xa, [X @ (B @ A).T for X, (A, B) in zip(Xa, adapters)])
        close(sums.delta()["l"], want)
        close(TaskSums.from_state_dict(sums.state_dict()).delta()["l"], want, rtol=1e-12)


def test_head_regmean_and_bias_weighted_by_samples():
    rng = np.random.default_rng(10)
    K, m, d = 3, 4, 9
    Xs = clients(rng, K, d=d)
    Ws = rng.standard_normal((K, m, d))
    bs = rng.standard_normal((K, m))
    counts = [len(X) for X in Xs]
    grams = [gram(X, 0.5) for X in Xs]
    WG = sum(torch.from_numpy(w) @ g for w, g in zip(Ws, grams))
    nb = sum(n * torch.from_numpy(b) for n, b in zip(counts, bs))
    W, b = head_from_sums(WG, sum(grams), nb, float(sum(counts)))
    Xa = [augmented(X, 0.5) for X in Xs]
    close(W, lstsq_fit(Xa, [X @ w.T for X, w in zip(Xa, Ws)]))
    close(b, (bs * np.array(counts)[:, None]).sum(0) / sum(counts))
    with pytest.raises(MergeError, match="positive total"):
        head_from_sums(WG, sum(grams), nb, 0.0)


def test_layers_are_solved_in_batches_with_the_per_layer_result():
    rng = np.random.default_rng(11)
    num, den = {}, {}
    for i in range(6):
        d = 5 if i % 2 else 8
        X = rng.standard_normal((20, d))
        num[f"l{i}"] = torch.from_numpy(rng.standard_normal((3, d)))
        den[f"l{i}"] = torch.from_numpy(X.T @ X) if i < 4 else torch.from_numpy((X**2).sum(0))
    batched = solve_layers(num, den)
    for name in num:
        close(batched[name], solve_regmean(num[name], den[name]).numpy(), rtol=1e-12)


def test_inconsistent_layers_are_refused():
    A = {"a": torch.zeros(2, 3)}
    with pytest.raises(MergeError, match="layers differ"):
        merge_round("B", A, [{"b": torch.zeros(4, 2)}], [{"b": torch.ones(3)}])
    with pytest.raises(MergeError, match="no client"):
        merge_round("B", A, [], [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_merge_runs_on_the_device_of_its_inputs():
    rng = np.random.default_rng(12)
    A = {"l": torch.from_numpy(rng.standard_normal((2, 6))).cuda()}
    trained = [{"l": torch.from_numpy(rng.standard_normal((4, 2))).cuda()}]
    grams = [{"l": gram(X, 0.5).cuda()} for X in clients(rng, 1, d=6)]
    out = merge_round("B", A, trained, grams, device="cuda")["l"]
    assert out.is_cuda
    close(out, trained[0]["l"].cpu().numpy())


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_b_round_from_projected_statistics_equals_the_raw_merge(alpha):
    """Clients may send A G_i A^T instead of G_i in a B-round: same merge, r x r numbers per layer."""
    from common.merges import project_gram

    rng = np.random.default_rng(13)
    r, d_out, d_in = 3, 6, 9
    A = {"l": torch.from_numpy(rng.standard_normal((r, d_in)))}
    trained = [{"l": torch.from_numpy(rng.standard_normal((d_out, r)))} for _ in range(4)]
    grams = [{"l": gram(X, alpha)} for X in clients(rng, 4, d=d_in)]
    projected = [{"l": project_gram(A["l"], g["l"])} for g in grams]
    raw = merge_round("B", A, trained, grams)["l"]
    close(merge_round("B", A, trained, projected, projected=True)["l"], raw.numpy(), rtol=1e-12)
    with pytest.raises(MergeError, match="A-round"):
        merge_round("A", A, [{"l": torch.zeros(r, d_in)}], projected[:1], projected=True)


def test_regmean_of_full_deltas_is_exact_in_low_rank_form():
    from common.merges import regmean_lowrank, times_gram

    rng = np.random.default_rng(14)
    K, r, d_out, d_in = 3, 2, 6, 8
    Xs = clients(rng, K, d=d_in)
    As = [rng.standard_normal((r, d_in)) for _ in range(K)]
    Bs = [rng.standard_normal((d_out, r)) for _ in range(K)]
    for alpha in (0.0, 0.5):
        grams = [gram(X, alpha) for X in Xs]
        A_stack, B_stack = regmean_lowrank(
            {"l": torch.cat([times_gram(torch.from_numpy(a), g) for a, g in zip(As, grams)])},
            {"l": torch.cat([torch.from_numpy(b) for b in Bs], dim=1)}, {"l": sum(grams)},
        )
        assert A_stack["l"].shape == (K * r, d_in) and B_stack["l"].shape == (d_out, K * r)
        Xa = [augmented(X, alpha) for X in Xs]
        want = lstsq_fit(Xa, [X @ (b @ a).T for X, a, b in zip(Xa, As, Bs)])
        close(B_stack["l"] @ A_stack["l"], want)
