"""Closed-form ROME / MEMIT / EMMET solvers (unifiededit.objective) against independent brute-force solves.

The reference solutions never use the solvers' algebra: they vectorize Δ (row-major, δ = vec(Δ)) and solve the
constrained problem as one dense system built from Kronecker products,
    tr(Δ C Δᵀ) = δᵀ (I_dout ⊗ C) δ,     ΔK = R  <=>  (I_dout ⊗ Kᵀ) δ = vec(R),
with numpy in float64 (the KKT system for equality constraints, the normal equations for the soft objective), or as
an ordinary least-squares problem for MEMIT.
"""
import math

import numpy as np
import pytest
import torch

from unifiededit.objective import (Preservation, UpdateInfo, emmet_update, memit_update, rome_update,
                                   update_flops)


pytestmark = pytest.mark.usefixtures("one_thread")


def problem(d_in=5, d_out=3, E=2, seed=0, n_tokens=None, dtype=torch.float64):
    "C = mean second moment of n_tokens uncentered random keys; E edit keys from the same law; random residuals."
    g = torch.Generator().manual_seed(seed)
    n_tokens = n_tokens or 6 * d_in
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    mean = torch.randn(d_in, 1, generator=g, dtype=torch.float64)
    K0 = mix @ torch.randn(d_in, n_tokens, generator=g, dtype=torch.float64) + mean
    K = mix @ torch.randn(d_in, E, generator=g, dtype=torch.float64) + mean
    R = torch.randn(d_out, E, generator=g, dtype=torch.float64)
    C = K0 @ K0.T / n_tokens
    return C.to(dtype), K.to(dtype), R.to(dtype)


# ---------------------------------------------------------------- independent references (numpy, float64)
def kkt_hard(C, K, R):
    "argmin tr(ΔCΔᵀ) s.t. ΔK = R via the full KKT system on δ = vec(Δ): [[H, -Aᵀ], [A, 0]] [δ; ν] = [0; vec R]."
    C, K, R = (np.asarray(x, dtype=np.float64) for x in (C, K, R))
    m, d, E = R.shape[0], C.shape[0], K.shape[1]
    H = np.kron(np.eye(m), C)                    # (m d, m d)
    A = np.kron(np.eye(m), K.T)                  # (m E, m d)
    kkt = np.block([[H, -A.T], [A, np.zeros((m * E, m * E))]])
    rhs = np.concatenate([np.zeros(m * d), R.reshape(-1)])
    return np.linalg.solve(kkt, rhs)[: m * d].reshape(m, d)


def normal_soft(C, K, R, mu=1.0):
    "argmin μ tr(ΔCΔᵀ) + ‖ΔK − R‖²_F via the normal equations on δ: (μ I⊗C + AᵀA) δ = Aᵀ vec R."
    C, K, R = (np.asarray(x, dtype=np.float64) for x in (C, K, R))
    m = R.shape[0]
    H, A = np.kron(np.eye(m), C), np.kron(np.eye(m), K.T)
    return np.linalg.solve(mu * H + A.T @ A, A.T @ R.reshape(-1)).reshape(m, -1)


def lstsq_soft(C, K, R, mu=1.0):
    "The same objective as ordinary least squares: ‖Δ [√μ L, K] − [0, R]‖²_F with C = L Lᵀ."
    C, K, R = (np.asarray(x, dtype=np.float64) for x in (C, K, R))
    L = np.linalg.cholesky(C)
    X = np.concatenate([math.sqrt(mu) * L, K], axis=1)              # (d, d + E)
    Y = np.concatenate([np.zeros((R.shape[0], C.shape[0])), R], axis=1)
    return np.linalg.lstsq(X.T, Y.T, rcond=None)[0].T


def close(a, b, rtol=1e-9):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b).max() <= rtol * max(1.0, np.abs(b).max())


# ---------------------------------------------------------------- correctness against brute force
@pytest.mark.parametrize("d_in,d_out,seed", [(1, 1, 0), (5, 3, 1), (7, 4, 2)])
def test_rome_matches_kkt(d_in, d_out, seed):
    C, K, R = problem(d_in, d_out, 1, seed)
    delta = rome_update(C, K[:, 0], R[:, 0])
    assert delta.shape == (d_out, d_in)
    assert close(delta, kkt_hard(C, K, R))
    assert close(delta @ K, R)


@pytest.mark.parametrize("E", [1, 2, 3, 5])
def test_emmet_matches_kkt(E):
    C, K, R = problem(5, 3, E, seed=10 + E)                          # E = 5 = d_in: square K
    delta = emmet_update(C, K, R)
    assert close(delta, kkt_hard(C, K, R), rtol=1e-8)
    assert close(delta @ K, R, rtol=1e-8)


@pytest.mark.parametrize("route", ["primal", "dual", "auto"])
@pytest.mark.parametrize("E", [1, 3, 9])                              # 9 > d_in: MEMIT is still well posed
def test_memit_matches_normal_equations_and_lstsq(route, E):
    C, K, R = problem(5, 3, E, seed=20 + E)
    delta = memit_update(C, K, R, route=route)
    assert close(delta, normal_soft(C, K, R))
    assert close(delta, lstsq_soft(C, K, R))


@pytest.mark.parametrize("route", ["primal", "dual"])
@pytest.mark.parametrize("alpha", [0.1, 2.5])
def test_regularized_emmet_is_memit_with_scaled_C(route, alpha):
    C, K, R = problem(6, 4, 4, seed=3)
    delta = emmet_update(C, K, R, emmet_lambda=alpha, route=route)
    assert close(delta, normal_soft(C, K, R, mu=alpha))              # the soft objective α tr(ΔCΔᵀ) + ‖ΔK−R‖²
    assert close(delta, memit_update(alpha * C, K, R))
    assert close(delta, memit_update(Preservation(C).scaled(alpha), K, R, route="dual"))


def test_batch_one_emmet_is_rome():
    C, K, R = problem(6, 4, 1, seed=4)
    assert close(emmet_update(C, K, R), rome_update(C, K[:, 0], R[:, 0]), rtol=1e-12)
    assert close(emmet_update(C, K, R), rome_update(C, K, R), rtol=1e-12)   # (d_in, 1) / (d_out, 1) accepted


def test_memit_tends_to_emmet_as_lambda_vanishes():
    C, K, R = problem(6, 4, 3, seed=5)
    exact = emmet_update(C, K, R)
    gaps = [float((memit_update(lam * C, K, R) - exact).norm() / exact.norm()) for lam in (1e-2, 1e-4, 1e-6)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert 50 < gaps[0] / gaps[1] < 200 and 50 < gaps[1] / gaps[2] < 200   # O(λ)
    assert gaps[2] < 1e-4


def test_rome_and_exact_emmet_do_not_depend_on_lambda_but_memit_does():
    C, K, R = problem(6, 4, 3, seed=6)
    assert close(rome_update(1e3 * C, K[:, 0], R[:, 0]), rome_update(C, K[:, 0], R[:, 0]))
    assert close(emmet_update(1e3 * C, K, R), emmet_update(C, K, R), rtol=1e-8)
    assert not close(memit_update(1e3 * C, K, R), memit_update(C, K, R), rtol=1e-3)


def test_solutions_beat_random_feasible_perturbations():
    C, K, R = problem(8, 5, 3, seed=7)
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(K)                                         # basis of span(K)
    f_hard = lambda D: torch.trace(D @ C @ D.T)
    f_soft = lambda D: f_hard(D) + (D @ K - R).square().sum()
    D_hard, D_soft = emmet_update(C, K, R), memit_update(C, K, R)
    for _ in range(200):
        P = torch.randn(5, 8, generator=g, dtype=torch.float64) * 1e-3
        assert f_soft(D_soft + P) > f_soft(D_soft)
        P = P - P @ Q @ Q.T                                           # feasible: P K = 0
        assert f_hard(D_hard + P) > f_hard(D_hard)


def test_route_choice_follows_flop_counts():
    C, K, R = problem(8, 3, 2, seed=8)
    assert memit_update(C, K, R, return_info=True)[1].route == "dual"
    C, K, R = problem(8, 3, 40, seed=8)
    _, info = memit_update(C, K, R, return_info=True)
    assert info.route == "primal"
    assert info.flops == update_flops(8, 40, 3)["primal"] < update_flops(8, 40, 3)["dual"]
    assert emmet_update(C, K, R, 0.1, return_info=True)[1].route == "primal"


# ---------------------------------------------------------------- dtypes, devices, reuse, determinism
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtype_of_R_is_returned_and_work_is_float64(dtype):
    C, K, R = problem(6, 4, 3, seed=9)
    Cd, Kd, Rd = C.to(dtype), K.to(dtype), R.to(dtype)
    for fn in (memit_update, emmet_update):
        out = fn(Cd, Kd, Rd)
        assert out.dtype == dtype and out.device == Rd.device
        # the solve itself is float64: equal to the float64 solve of the rounded inputs, rounded once at the end
        ref = fn(Cd.double(), Kd.double(), Rd.double()).to(dtype)
        assert torch.equal(out, ref)
    out = rome_update(Cd, Kd[:, 0], Rd[:, 0])
    assert out.dtype == dtype


def test_mixed_dtypes_follow_R():
    C, K, R = problem(6, 4, 3, seed=10)
    out = emmet_update(C.float(), K, R.half())
    assert out.dtype == torch.float16
    assert close(out.double(), emmet_update(C.float().double(), K, R.half().double()), rtol=1e-3)


@pytest.mark.gpu
def test_cuda_inputs_return_on_cuda_and_match_cpu():
    C, K, R = problem(6, 4, 3, seed=11)
    P = Preservation(C)                                             # on CPU; moved to R's device by the solver
    for fn in (memit_update, emmet_update):
        out = fn(P, K.cuda(), R.cuda().float())
        assert out.device.type == "cuda" and out.dtype == torch.float32
        assert close(out.cpu(), fn(C, K, R).float(), rtol=1e-5)


def test_preservation_object_gives_identical_updates():
    C, K, R = problem(6, 4, 3, seed=12)
    P = Preservation(C)
    assert torch.equal(memit_update(P, K, R), memit_update(C, K, R))
    assert torch.equal(emmet_update(P, K, R), emmet_update(C, K, R))
    assert torch.equal(rome_update(P, K[:, 0], R[:, 0]), rome_update(C, K[:, 0], R[:, 0]))
    assert close(P.scaled(3.0).C, 3.0 * C) and close(P.scaled(3.0).L @ P.scaled(3.0).L.T, 3.0 * C)
    assert close(P.solve(K), np.linalg.solve(C.numpy(), K.numpy()))
    assert close(P.cost(R @ K.T), np.trace((R @ K.T).numpy() @ C.numpy() @ (R @ K.T).numpy().T))
    assert P.d_in == 6 and P.C.dtype == torch.float64
    assert close(P.cond(), np.linalg.cond(C.numpy()), rtol=1e-6)


def test_determinism():
    C, K, R = problem(12, 5, 4, seed=13)
    for fn in (memit_update, emmet_update):
        assert torch.equal(fn(C, K, R), fn(C, K, R))
        assert torch.equal(fn(C.float(), K.float(), R.float()), fn(C.float(), K.float(), R.float()))


# ---------------------------------------------------------------- diagnostics
def test_info_matches_independent_computation_and_does_not_change_delta():
    C, K, R = problem(6, 4, 3, seed=14)
    Cn, Kn, Rn = C.numpy(), K.numpy(), R.numpy()
    gram = Kn.T @ np.linalg.solve(Cn, Kn)
    for fn, kwargs, ridge in ((emmet_update, {}, 0.0), (memit_update, {}, 1.0), (emmet_update, {"emmet_lambda": 0.3}, 0.3)):
        plain = fn(C, K, R, **kwargs)
        delta, info = fn(C, K, R, return_info=True, **kwargs)
        assert torch.equal(delta, plain)
        assert isinstance(info, UpdateInfo) and info.n_edits == 3 and info.ridge == ridge
        D = delta.numpy()
        assert close(info.cond_gram, np.linalg.cond(gram), rtol=1e-6)
        assert close(info.constraint_residual, np.linalg.norm(D @ Kn - Rn) / np.linalg.norm(Rn), rtol=1e-8)
        assert close(info.delta_norm, np.linalg.norm(D), rtol=1e-12)
        assert close(info.preservation_cost, np.trace(D @ Cn @ D.T), rtol=1e-10)
    assert emmet_update(C, K, R, return_info=True)[1].constraint_residual < 1e-12
    assert memit_update(C, K, R, return_info=True)[1].constraint_residual > 1e-3
    delta, info = rome_update(C, K[:, 0], R[:, 0], return_info=True)
    assert info.method == "rome" and info.cond_gram == pytest.approx(1.0) and info.constraint_residual < 1e-12


def test_info_cond_is_infinite_beyond_d_in():
    C, K, R = problem(4, 2, 9, seed=15)
    _, info = memit_update(C, K, R, return_info=True)
    assert info.cond_gram == math.inf and 0 < info.constraint_residual < 1


# ---------------------------------------------------------------- errors name the cause and the fix
def test_duplicate_keys_refused_for_exact_emmet_only():
    C, K, R = problem(6, 4, 3, seed=16)
    Kd, Rd = torch.cat([K, K[:, 1:2]], 1), torch.cat([R, -R[:, 1:2]], 1)
    with pytest.raises(ValueError, match=r"edits \(1, 3\) have the same key.*Set emmet_lambda > 0 or remove duplicate"):
        emmet_update(C, Kd, Rd)
    assert torch.isfinite(emmet_update(C, Kd, Rd, emmet_lambda=0.1)).all()
    assert torch.isfinite(memit_update(C, Kd, Rd)).all()


def test_nearly_dependent_keys_refused_for_exact_emmet():
    C, K, R = problem(6, 4, 3, seed=17)
    Kd = torch.cat([K, K[:, :2] @ torch.tensor([[0.3], [0.7]], dtype=torch.float64) * (1 + 1e-15)], 1)
    with pytest.raises(ValueError, match="numerically singular.*emmet_lambda > 0"):
        emmet_update(C, Kd, torch.randn(4, 4, dtype=torch.float64))


def test_vanishing_preservation_weight_primal_refused_dual_fine():
    "μC + KKᵀ with E < d_in and a negligible C is singular in float64; the (E, E) route stays well conditioned."
    C, K, R = problem(6, 3, 2, seed=24)
    with pytest.raises(ValueError, match=r"μC \+ KKᵀ .* numerically singular.*mom2_update_weight"):
        memit_update(1e-20 * C, K, R, route="primal")
    assert close(memit_update(1e-20 * C, K, R, route="dual"), emmet_update(C, K, R), rtol=1e-8)


def test_more_edits_than_key_dimensions_refused_for_exact_emmet():
    C, K, R = problem(4, 2, 9, seed=18)
    with pytest.raises(ValueError, match=r"needs E <= d_in, got E = 9 edits with d_in = 4.*emmet_lambda > 0"):
        emmet_update(C, K, R)
    assert emmet_update(C, K, R, emmet_lambda=0.1).shape == (2, 4)


@pytest.mark.parametrize("bad,msg", [
    ("rank_deficient", "not positive definite"),
    ("negative", "not positive definite"),
    ("zero", "not positive definite"),
    ("asymmetric", "not symmetric"),
])
def test_bad_C(bad, msg):
    C, K, R = problem(5, 3, 2, seed=19)
    A = torch.randn(5, 3, dtype=torch.float64)
    Cbad = {"rank_deficient": A @ A.T, "negative": C - 2 * torch.linalg.eigvalsh(C).max() * torch.eye(5).double(),
            "zero": torch.zeros(5, 5, dtype=torch.float64),
            "asymmetric": C + torch.triu(torch.ones(5, 5, dtype=torch.float64))}[bad]
    for call in (lambda: Preservation(Cbad), lambda: memit_update(Cbad, K, R), lambda: rome_update(Cbad, K[:, 0], R[:, 0])):
        with pytest.raises(ValueError, match=msg):
            call()


def test_float32_rounding_asymmetry_is_tolerated():
    C, K, R = problem(6, 4, 3, seed=20, dtype=torch.float32)
    C = C + 1e-7 * torch.randn(6, 6) * C.abs().max()                  # rounding-level asymmetry
    assert torch.isfinite(emmet_update(C, K, R)).all()


@pytest.mark.parametrize("call,msg", [
    (lambda C, K, R: memit_update(C, K.T, R), r"K must be \(d_in, E\) = \(6, E\).*got \(3, 6\).*transpose"),
    (lambda C, K, R: memit_update(C, K, R[:, :2]), r"R must be \(d_out, E\) = \(d_out, 3\).*got \(4, 2\)"),
    (lambda C, K, R: emmet_update(C, K, R.T), r"R must be .*got \(3, 4\).*transpose"),
    (lambda C, K, R: memit_update(C[:, :5], K, R), r"square .*\(6, 5\)"),
    (lambda C, K, R: memit_update(C[:5, :5], K, R), r"\(5, E\).*got \(6, 3\)"),
    (lambda C, K, R: rome_update(C, K, R), r"k must be one key.*\(6, 3\).*emmet_update"),
    (lambda C, K, R: rome_update(C, K[:, 0], R), r"r must be one residual.*\(4, 3\)"),
    (lambda C, K, R: memit_update(C, K[:, :0], R[:, :0]), r"E = 0"),
    (lambda C, K, R: rome_update(C, torch.zeros(6, dtype=torch.float64), R[:, 0]), "zero vector"),
    (lambda C, K, R: emmet_update(C, K, R, emmet_lambda=-0.1), "emmet_lambda must be"),
    (lambda C, K, R: emmet_update(C, K, R, emmet_lambda=float("nan")), "emmet_lambda must be"),
    (lambda C, K, R: memit_update(C, K, R, route="fastest"), "route must be"),
    (lambda C, K, R: emmet_update(C, K, R, route="primal"), "no \\(d_in, d_in\\) form"),
])
def test_shape_and_argument_errors(call, msg):
    C, K, R = problem(6, 4, 3, seed=21)
    with pytest.raises(ValueError, match=msg):
        call(C, K, R)


@pytest.mark.parametrize("where", ["C", "K", "R"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_refused_naming_the_argument(where, value):
    args = dict(zip("CKR", problem(6, 4, 3, seed=22)))
    args[where] = args[where].clone()
    args[where][1, 1] = value
    for fn in (memit_update, emmet_update):
        with pytest.raises(ValueError, match=f"^{where} contains 1 non-finite"):
            fn(args["C"], args["K"], args["R"])


def test_type_errors():
    C, K, R = problem(6, 4, 3, seed=23)
    with pytest.raises(TypeError, match="C must be a torch.Tensor or a Preservation"):
        memit_update(C.numpy(), K, R)
    with pytest.raises(TypeError, match="K must have a floating-point dtype"):
        memit_update(C, K.long(), R)
    with pytest.raises(TypeError, match="R must be a torch.Tensor"):
        memit_update(C, K, R.tolist())


# ---------------------------------------------------------------- scale
@pytest.mark.slow
def test_ten_thousand_edits_regularized_emmet_equals_memit():
    "E = 10,000 > d_in = 1,536 (SmolLM2-135M's MLP width): only the soft constraint has a solution."
    d_in, d_out, E, alpha = 1536, 576, 10_000, 0.1
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
    K0 = mix @ torch.randn(d_in, 4 * d_in, generator=g, dtype=torch.float64)
    C = K0 @ K0.T / K0.shape[1]
    del K0
    K = (mix @ torch.randn(d_in, E, generator=g, dtype=torch.float64)).float()
    R = torch.randn(d_out, E, generator=g, dtype=torch.float32)
    P = Preservation(C)

    d_emmet, info = emmet_update(P, K, R, emmet_lambda=alpha, route="dual", return_info=True)  # (E, E) system
    d_memit = memit_update(P.scaled(alpha), K, R, route="primal")                              # (d_in, d_in)
    assert d_emmet.shape == (d_out, d_in) and d_emmet.dtype == torch.float32
    rel = float((d_emmet.double() - d_memit.double()).norm() / d_memit.double().norm())
    assert rel < 1e-5, rel

    # constraint residual: no update can beat the least-squares floor ‖R (I − K⁺K)‖ / ‖R‖ ≈ sqrt(1 − d_in/E)
    Q, _ = torch.linalg.qr(K.double().T)                                # (E, d_in) basis of K's row space
    Rd = R.double()
    floor = float((Rd - (Rd @ Q) @ Q.T).norm() / Rd.norm())
    assert abs(floor - math.sqrt(1 - d_in / E)) < 0.02
    assert floor - 1e-9 <= info.constraint_residual < floor + 1e-3
    assert info.cond_gram == math.inf and info.n_edits == E
    with pytest.raises(ValueError, match="needs E <= d_in"):
        emmet_update(P, K, R)
