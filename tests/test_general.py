"""Tests of unifiededit.general and of the extended methods through `edit`: each special case reduces exactly to
MEMIT / EMMET / ROME, each closed form equals a direct transcription of its formula on random problems and satisfies
its optimality conditions, earlier edits are carried in an `EditHistory`, and bad inputs are refused."""
import pytest
import torch

import unifiededit as ue
from unifiededit.corpus import model_sampled_corpus
from unifiededit.general import alphaedit_update, encore_update, nullspace, preservation_terms, rome_variant_update
from unifiededit.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer
from unifiededit.objective import emmet_update, memit_update
from unifiededit.stats import collect_key_stats

pytestmark = pytest.mark.usefixtures("one_thread")
f64 = torch.float64


def problem(d_in=12, d_out=5, E=3, n0=40, n_prev=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    K0 = torch.randn(d_in, n0, generator=g, dtype=f64)
    C0 = K0 @ K0.T / n0
    K = torch.randn(d_in, E, generator=g, dtype=f64)
    R = torch.randn(d_out, E, generator=g, dtype=f64)
    Kp = torch.randn(d_in, n_prev, generator=g, dtype=f64)
    return C0, K, R, Kp


# ---- closed forms against their formulas --------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_encore_equals_its_formula_and_is_stationary(seed):
    C0, K, R, Kp = problem(seed=seed)
    lam, mu = 7.0, 0.3
    D = encore_update(C0, K, R, mom2_update_weight=lam, update_norm_lambda=mu, prev_gram=Kp @ Kp.T)
    A = lam * C0 + mu * torch.eye(C0.shape[0], dtype=f64) + Kp @ Kp.T + K @ K.T
    direct = torch.linalg.solve(A, (R @ K.T).T).T                  # R Kᵀ A⁻¹ (A symmetric)
    torch.testing.assert_close(D, direct, rtol=1e-10, atol=1e-12)
    # ∂/∂Δ [λ tr(ΔC0Δᵀ) + μ‖Δ‖² + ‖ΔK_p‖² + ‖ΔK - R‖²] / 2 = Δ(λC0 + μI + K_pK_pᵀ) + (ΔK - R)Kᵀ = 0
    grad = D @ (lam * C0 + mu * torch.eye(C0.shape[0], dtype=f64) + Kp @ Kp.T) + (D @ K - R) @ K.T
    assert grad.abs().max() < 1e-10 * R.abs().max()


def test_encore_without_norm_or_history_is_memit():
    C0, K, R, _ = problem()
    torch.testing.assert_close(encore_update(C0, K, R, mom2_update_weight=5.0), memit_update(5.0 * C0, K, R),
                               rtol=1e-12, atol=0)


def test_a_large_preservation_weight_approaches_emmet():
    "MEMIT's soft constraint becomes EMMET's hard one as the other terms shrink relative to ‖ΔK - R‖²."
    C0, K, R, _ = problem()
    hard = emmet_update(C0, K, R)
    soft = encore_update(C0, K, R, mom2_update_weight=1e-9)
    torch.testing.assert_close(soft, hard, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(hard @ K, R, rtol=1e-10, atol=1e-10)   # EMMET writes the keys exactly


@pytest.mark.parametrize("seed", range(3))
def test_alphaedit_equals_its_formula_and_leaves_the_preserved_keys(seed):
    C0, K, R, Kp = problem(seed=seed)
    ev, V = torch.linalg.eigh(C0)
    C0 = V @ torch.diag(torch.where(torch.arange(len(ev)) < 4, 1e-8 * ev, ev)) @ V.T   # 4 nearly-free directions
    ns = nullspace(C0, relative=1e-6)
    assert ns.rank == 4
    P = ns.U @ ns.U.T
    alpha = 2.5
    D = alphaedit_update(ns, K, R, L2=alpha, prev_gram=Kp @ Kp.T)
    direct = R @ K.T @ P @ torch.linalg.inv(Kp @ Kp.T @ P + K @ K.T @ P + alpha * torch.eye(len(ev), dtype=f64))
    torch.testing.assert_close(D, direct, rtol=1e-8, atol=1e-10)  # the paper's formula, inverse and all
    big = V[:, 4:]                                                 # the directions C0 keeps
    assert (D @ big).abs().max() < 1e-10 * D.abs().max()           # ΔK0 ≈ 0: Δ acts only on the null space
    assert torch.trace(D @ C0 @ D.T) < 1e-6 * torch.trace(D @ D.T) * ev[-1]


def test_nullspace_thresholds():
    C0 = torch.diag(torch.tensor([1e-9, 1e-4, 1.0, 2.0], dtype=f64))
    assert nullspace(C0, 1e-3).rank == 2 and nullspace(C0, relative=1e-3).rank == 2 and nullspace(C0, 1.5).rank == 3
    with pytest.raises(ValueError, match="exactly one"): nullspace(C0)
    with pytest.raises(ValueError, match="exactly one"): nullspace(C0, 1e-3, relative=1e-3)
    with pytest.raises(ValueError, match="> 0"): nullspace(C0, -1.0)
    with pytest.raises(ValueError, match="null space is empty"): nullspace(C0, 1e-12)


def test_rome_variants():
    C0, K, R, _ = problem(E=2)
    km, kb = K[:, 0], K[:, 1]
    W = torch.randn(R.shape[0], C0.shape[0], dtype=f64, generator=torch.Generator().manual_seed(3))
    v = torch.randn(R.shape[0], dtype=f64)
    r_bare = v - W @ kb                                            # what ROME's code computes the residual from
    u = torch.linalg.solve(C0, km)
    # 'emmet' is EMMET with one edit at the averaged key; 'original' ROME's code: C⁻¹k_mean, 1 / (k_bareᵀC⁻¹k_mean)
    torch.testing.assert_close(rome_variant_update(C0, km, kb, r_bare, variant="emmet"),
                               emmet_update(C0, km[:, None], r_bare[:, None]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rome_variant_update(C0, km, kb, r_bare, variant="original"),
                               torch.outer(r_bare, u) / (kb @ u), rtol=1e-10, atol=1e-12)
    # r-ROME: the averaged key everywhere, the residual at that key: (W + Δ) k_mean = v exactly
    D = rome_variant_update(C0, km, kb, r_bare, W=W, variant="r-rome")
    torch.testing.assert_close((W + D) @ km, v, rtol=1e-10, atol=1e-10)
    # p-ROME: the prompt's key everywhere: (W + Δ) k_bare = v exactly
    D = rome_variant_update(C0, km, kb, r_bare, variant="p-rome")
    torch.testing.assert_close((W + D) @ kb, v, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="needs W"): rome_variant_update(C0, km, kb, r_bare, variant="r-rome")
    with pytest.raises(ValueError, match="unknown rome_keys 'x'"): rome_variant_update(C0, km, kb, r_bare, variant="x")


@pytest.mark.parametrize("kw, match", [
    (dict(mom2_update_weight=-1.0), "mom2_update_weight"), (dict(update_norm_lambda=float("nan")), "norm_lambda"),
    (dict(prev_gram=torch.eye(3, dtype=f64)), "prev_gram"),
])
def test_encore_bad_inputs(kw, match):
    C0, K, R, _ = problem()
    with pytest.raises(ValueError, match=match):
        encore_update(C0, K, R, **kw)


def test_preservation_terms():
    A = preservation_terms(torch.eye(2, dtype=f64), 2.0, 0.5, torch.ones(2, 2, dtype=f64))
    torch.testing.assert_close(A, torch.tensor([[3.5, 1.0], [1.0, 3.5]], dtype=f64))


# ---- through edit, on a tiny model --------------------------------------------------------------------------------

REQS = [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": {"str": "Rome"}},
        {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"}}]
MORE = [{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": {"str": "English"}}]


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("gpt2", initializer_range=0.1)
    tok = tiny_tokenizer(TINY_FAMILIES["gpt2"])
    hp = ue.HParams.for_model(model, "memit", v_num_grad_steps=8)
    corpus = model_sampled_corpus(model, tok, 4000, seed=0, length=128)
    stats = collect_key_stats(model, tok, hp.layers, corpus, n_tokens=4000, max_length=128, progress=False)
    return model, tok, hp, stats


def _deltas(e):
    return {l: d.clone() for l, d in e.deltas.items()}


def test_edit_encore_with_mu_zero_and_no_history_is_memit(tiny):
    model, tok, hp, stats = tiny
    memit = ue.edit(model, tok, REQS, hparams=hp, stats=stats, progress=False); dm = _deltas(memit); memit.revert()
    hp_e = hp.replace(method="encore", update_norm_lambda=0.0, prob_cutoff=None, add_prev_edits=True)
    enc = ue.edit(model, tok, REQS, hparams=hp_e, stats=stats, progress=False); de = _deltas(enc); enc.revert()
    assert dm.keys() == de.keys()
    for l in dm:
        torch.testing.assert_close(de[l], dm[l], rtol=1e-5, atol=1e-7)


def test_edit_encore_uses_the_history_and_records_into_it(tiny, tmp_path):
    model, tok, hp, stats = tiny
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    hp_e = hp.replace(method="encore", prob_cutoff=None)
    h = ue.EditHistory()
    e1 = ue.edit(model, tok, REQS, hparams=hp_e, stats=stats, history=h, progress=False)
    assert {l: h.count(l) for l in hp.layers} == {l: 2 for l in hp.layers}
    saved = h.save(tmp_path / "h.safetensors")
    e2 = ue.edit(model, tok, MORE, hparams=hp_e, stats=stats, history=h, progress=False)
    assert {l: h.count(l) for l in hp.layers} == {l: 3 for l in hp.layers}
    d_with = _deltas(e2); e2.revert()
    e2b = ue.edit(model, tok, MORE, hparams=hp_e, stats=stats, progress=False)  # the same edit, no earlier keys
    d_without = _deltas(e2b); e2b.revert()
    assert any((d_with[l] - d_without[l]).abs().max() > 1e-4 * d_without[l].abs().max() for l in d_with)
    h2 = ue.EditHistory.load(saved)                                 # the history after the first edit, reloaded
    e2c = ue.edit(model, tok, MORE, hparams=hp_e, stats=stats, history=h2, progress=False)
    for l in d_with:
        torch.testing.assert_close(e2c.deltas[l], d_with[l], rtol=1e-6, atol=1e-8)
    e2c.revert(); e1.revert()
    assert all(torch.equal(p, w0[n]) for n, p in model.named_parameters())


def test_edit_alphaedit_keeps_the_preserved_directions(tiny):
    model, tok, hp, stats = tiny
    hp_a = ue.HParams.for_model(model, "alphaedit", v_num_grad_steps=8, layers=hp.layers)
    e = ue.edit(model, tok, REQS, hparams=hp_a, stats=stats, progress=False)
    for l, d in e.deltas.items():
        C0 = stats[l].mom2 if hasattr(stats[l], "mom2") else stats[l]
        C0 = C0.to(f64)
        ns = nullspace(C0, hp_a.nullspace_threshold, relative=hp_a.nullspace_relative)
        ev, V = torch.linalg.eigh(C0)
        kept = V[:, ev >= ns.threshold]
        assert (d.to(f64) @ kept).abs().max() < 1e-4 * d.abs().max()
    e.revert()


def test_edit_rome_key_variants_differ_and_repeat_exactly(tiny):
    model, tok, _, stats = tiny
    hp = ue.HParams.for_model(model, "rome", v_num_grad_steps=8)
    deltas = {}
    for variant in ("emmet", "original", "r-rome", "p-rome"):
        e = ue.edit(model, tok, REQS[:1], hparams=hp.replace(rome_keys=variant), stats=stats, progress=False)
        deltas[variant] = next(iter(e.deltas.values())).clone()
        e.revert()
    again = ue.edit(model, tok, REQS[:1], hparams=hp, stats=stats, progress=False)   # same inputs: same update
    assert torch.equal(next(iter(again.deltas.values())), deltas["emmet"])
    again.revert()
    for a, b in [("emmet", "original"), ("emmet", "p-rome"), ("original", "p-rome")]:
        assert not torch.allclose(deltas[a], deltas[b], rtol=1e-3), (a, b)


def test_edit_refuses_bad_method_settings(tiny):
    model, tok, hp, stats = tiny
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="rome_keys"):
        ue.edit(model, tok, REQS[:1], hparams=ue.HParams.for_model(model, "rome"), stats=stats, rome_keys="q-rome",
                progress=False)
    with pytest.raises(ValueError, match="nullspace"):
        ue.edit(model, tok, REQS, hparams=hp.replace(method="alphaedit", nullspace_threshold=None,
                                                       nullspace_relative=None), stats=stats, progress=False)
    with pytest.raises(ValueError, match="update_norm_lambda"):
        ue.edit(model, tok, REQS, hparams=hp.replace(method="encore"), stats=stats, update_norm_lambda=-1.0,
                progress=False)
    assert all(torch.equal(p, w0[n]) for n, p in model.named_parameters())
