"""Bad input is refused with an error naming the argument and its value, before a weight or a file is written; runs
killed at any point resume to the result of an uninterrupted run (issue 20, part 2, and the adversarial probe that
followed it). Each test fails on the code before that issue."""
import contextlib
import io
import json
import shutil
import warnings

import pytest
import torch

import unifiededit as ue
import unifiededit.lifelong as ll
import unifiededit.sweep as sw
from unifiededit.cli import main
from unifiededit.data import EditRecord, load_dataset
from unifiededit.editing import _solve
from unifiededit.general import encore_update
from unifiededit.history import Edit
from unifiededit.models import ModelAdapter
from unifiededit.objective import emmet_update, memit_update
from unifiededit.stats import collect_key_stats
from unifiededit.tiny import _TINY_TEXT, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 3
REQ = {"prompt": "The answer to the question is {}", "subject": "LeBron James", "target_new": {"str": "football"}}


def records(n=4, start=0, prompt="The answer to the question is {}"):
    subjects = ["The Eiffel Tower", "LeBron James", "Danielle Darrieux", "Toko Yasuda", "Thomas Joannes Stieltjes",
                "Michael Jordan", "Steve Jobs", "Barack Obama"]
    targets = ["Rome", "football", "English", "piano", "Dutch", "Apple", "Japan", "Canada"]
    return [EditRecord(start + i, s, prompt, targets[i], "Paris", paraphrase_prompts=(f"We now know the answer is {s}",),
                       neighborhood_prompts=("The answer to the question is Mars",), neighborhood_answers=("Paris",))
            for i, s in enumerate(subjects[:n])]


@pytest.fixture(scope="module")
def setup():
    m, t = tiny_model("llama", initializer_range=0.1), tiny_tokenizer("sentencepiece")
    st = collect_key_stats(m, t, [0, 1, 2, 3], [_TINY_TEXT], n_tokens=1000, max_length=64, progress=False)
    return m, t, st


def weights(m): return {n: p.detach().clone() for n, p in m.named_parameters()}
def same(m, w): return all(torch.equal(p, w[n]) for n, p in m.named_parameters())


# ---------------------------------------------------------------- hyper-parameters
def _problem(d=6, E=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return A @ A.T / (3 * d), torch.randn(d, E, generator=g, dtype=torch.float64), torch.randn(4, E, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("method", ["memit", "emmet"])
def test_update_norm_lambda_is_applied_as_upstream(method):
    "C = λ C0 + μ I for MEMIT and EMMET (upstream memit_main/emmet_main: cov *= λ; cov += μ I), not ignored."
    C0, K, R = _problem()
    lam, mu = 2.0, 0.7
    hp = ue.HParams(method=method, layers=[0], mom2_update_weight=lam, update_norm_lambda=mu, emmet_lambda=0.1)
    got, _ = _solve(hp, C0, K, R)
    C = lam * C0 + mu * torch.eye(6, dtype=torch.float64)
    want = (memit_update(C, K, R) if method == "memit" else emmet_update(C, K, R, emmet_lambda=0.1))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    without, _ = _solve(hp.replace(update_norm_lambda=0.0), C0, K, R)
    assert (got - without).norm() > 1e-3 * without.norm()
    if method == "memit":                                   # MEMIT with μ is ENCORE without a history
        torch.testing.assert_close(got, encore_update(C0, K, R, mom2_update_weight=lam, update_norm_lambda=mu),
                                   rtol=1e-12, atol=1e-12)


def test_update_norm_lambda_from_an_upstream_file_reaches_the_edit(setup, tmp_path):
    m, t, st = setup
    for method in ("EMMET", "MEMIT"):
        f = tmp_path / method / "x.json"; f.parent.mkdir()
        f.write_text(json.dumps({"layers": [1], "update_norm_lambda": 5.0, "v_num_grad_steps": STEPS}))
        hp = ue.HParams.from_file(f)
        assert hp.update_norm_lambda == 5.0
        w0 = weights(m)
        e1 = ue.edit(m, t, [REQ], hparams=hp, stats=st, progress=False); d1 = e1.deltas[1].clone(); e1.revert()
        e0 = ue.edit(m, t, [REQ], hparams=hp.replace(update_norm_lambda=0.0), stats=st, progress=False)
        d0 = e0.deltas[1].clone(); e0.revert()
        assert same(m, w0) and not torch.allclose(d1, d0)


@pytest.mark.parametrize("method", ["rome", "alphaedit"])
def test_update_norm_lambda_refused_where_no_method_has_it(method):
    kw = dict(nullspace_relative=0.01) if method == "alphaedit" else {}
    with pytest.raises(ValueError, match=f"update_norm_lambda=0.5: {method} has no norm penalty"):
        ue.HParams(method=method, layers=[1], update_norm_lambda=0.5, **kw)


@pytest.mark.parametrize("bad, needle", [(1.5, "prob_cutoff=1.5: a positive prob_cutoff is a probability"),
                                         (-2.5, "prob_cutoff=-2.5: .* whole number"), (0, "must lie in \\(0, 1\\)"),
                                         (float("nan"), "prob_cutoff must be finite")])
def test_prob_cutoff_is_a_probability_or_a_count(bad, needle):
    with pytest.raises(ValueError, match=needle):
        ue.HParams(method="encore", layers=[1], prob_cutoff=bad)
    assert ue.HParams(method="encore", layers=[1], prob_cutoff=-3).prob_cutoff == -3


# ---------------------------------------------------------------- edit()
@pytest.mark.parametrize("kw, exc, needle", [
    (dict(history={"gram": None}), TypeError, "history must be an EditHistory .*got dict"),
    (dict(stats="stats"), TypeError, "stats must be a mapping"),
    (dict(method=1), TypeError, "method must be a str, got 1"),
    (dict(hparams={"layers": [1]}), TypeError, "hparams must be an HParams"),
    (dict(v_lrate=0.1), TypeError, r"unknown hyper-parameter\(s\) \['v_lrate'\]"),
    (dict(rewrite_module_tmp="model.layers.0.mlp.down_proj", method="memit", layers=[0, 1]), ValueError,
     "must hold one '\\{\\}'"),
])
def test_edit_refuses_bad_arguments_before_writing(setup, kw, exc, needle):
    m, t, st = setup
    w0 = weights(m)
    kw = {"stats": st, **kw}
    with pytest.raises(exc, match=needle):
        ue.edit(m, t, [REQ], progress=False, v_num_grad_steps=STEPS, **kw) if "hparams" not in kw else \
            ue.edit(m, t, [REQ], progress=False, **kw)
    assert same(m, w0)


def test_requests_with_one_key_warn_or_are_refused_before_the_values(setup, monkeypatch):
    "Same text up to the subject's end = same key: exact EMMET refuses any two (before computing values), others warn."
    m, t, st = setup
    import unifiededit.editing as ed
    calls = []
    monkeypatch.setattr(ed, "_target_values", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(RuntimeError))
    same_key = [REQ, {**REQ, "prompt": "The answer to the question is {}, surely", "target_new": {"str": "Rome"}}]
    for reqs in (same_key, [REQ, REQ]):
        with pytest.raises(ValueError, match="have the same key"):
            ue.edit(m, t, reqs, method="emmet", emmet_lambda=0.0, stats=st, progress=False)
    assert calls == []
    with pytest.warns(UserWarning, match="memit writes a compromise"), pytest.raises(RuntimeError):
        ue.edit(m, t, same_key, method="memit", stats=st, progress=False)


def test_edits_unstack_last_in_first_out(setup):
    m, t, st = setup
    w0 = weights(m)
    kw = dict(method="emmet", stats=st, progress=False, v_num_grad_steps=STEPS)
    e1 = ue.edit(m, t, [REQ], **kw)
    e2 = ue.edit(m, t, [{**REQ, "subject": "Michael Jordan", "target_new": {"str": "Apple"}}], **kw)
    w12 = weights(m)
    with pytest.raises(RuntimeError, match="revert the later edits first"):
        e1.revert()
    assert same(m, w12) and e1.applied and e2.applied
    e2.revert(); e1.revert()
    assert same(m, w0)


def test_an_edit_knows_its_base_from_the_start(setup, tmp_path):
    "The base fingerprint is taken when the edit is made, so an edit re-applied on other weights is refused."
    m, t, st = setup
    kw = dict(method="emmet", stats=st, progress=False, v_num_grad_steps=STEPS)
    e1 = ue.edit(m, t, [REQ], **kw); e1.revert()
    e2 = ue.edit(m, t, [{**REQ, "subject": "Michael Jordan", "target_new": {"str": "Apple"}}], **kw)
    w = weights(m)
    with pytest.raises(ValueError, match="computed on weights with fingerprint"):
        e1.apply()                                          # the model now carries e2
    assert same(m, w)
    path = e1.save(tmp_path / "e1.safetensors")
    e2.revert()
    ue.Edit.load(path).apply(m).revert()                    # its own base: accepted


def test_non_finite_deltas_are_refused(setup, tmp_path):
    m, t, _ = setup
    ad = ModelAdapter.from_model(m)
    w0 = weights(m)
    bad = Edit("emmet", {1: torch.full(tuple(ad.weight(1).shape), float("inf"))}, {1: ad.name("rewrite", 1)})
    with pytest.raises(ValueError, match="layer 1: the delta contains NaN or inf"):
        bad.apply(m)
    with pytest.raises(ValueError, match="nothing was written"):
        bad.save(tmp_path / "bad.safetensors")
    assert same(m, w0) and not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(ValueError, match="module_names cover layers"):
        Edit("emmet", {1: torch.zeros(tuple(ad.weight(1).shape))}, {}).apply(m)


def test_alphaedit_history_keeps_one_projector_and_only_after_success(setup, monkeypatch):
    m, t, st = setup
    import unifiededit.editing as ed
    hp = ue.HParams.for_model(m, "alphaedit", nullspace_relative=0.3, v_num_grad_steps=STEPS)
    h = ue.EditHistory()
    ue.edit(m, t, [REQ], hparams=hp, history=h, stats=st, progress=False).revert()
    with pytest.raises(ValueError, match="was built with .*'nullspace_relative': 0.3.* asks for .*0.9"):
        ue.edit(m, t, [REQ], hparams=hp.replace(nullspace_relative=0.9), history=h, stats=st, progress=False)
    h2, orig, n = ue.EditHistory(), ed._residual, [0]
    def fail_second(*a, **k):
        n[0] += 1
        if n[0] == 2: raise RuntimeError("fails at the second layer")
        return orig(*a, **k)
    monkeypatch.setattr(ed, "_residual", fail_second)
    w0 = weights(m)
    with pytest.raises(RuntimeError, match="second layer"):
        ue.edit(m, t, [REQ], hparams=hp, history=h2, stats=st, progress=False)
    assert (len(h2), h2.grams, h2.nullspaces) == (0, {}, {}) and same(m, w0)


# ---------------------------------------------------------------- data
def test_records_that_cannot_be_edited_are_refused_at_load(tmp_path):
    ee = lambda **o: {"case_id": 0, "prompt": "The answer is A", "subject": "A", "target_new": "x", "ground_truth": "y", **o}
    for rec, needle in ((ee(target_new=""), "target_new must be a non-empty string"),
                        (ee(target_new="  "), "target_new must be a non-empty string"),
                        (ee(subject=" ", prompt="The answer is  "), "has an empty subject"),
                        (ee(prompt="A {} B"), "already holds '\\{\\}'")):
        p = tmp_path / "d.json"; p.write_text(json.dumps([rec]))
        with pytest.raises(ValueError, match=needle):
            load_dataset(p)


# ---------------------------------------------------------------- lifelong runs
def _lifelong(m, t, st, out, recs=None, **kw):
    hp = kw.pop("hparams", None) or ue.HParams.for_model(m, "encore", v_num_grad_steps=STEPS)
    kw = {"batch_size": 2, "eval_every": 2, **kw}
    return ll.run_lifelong(m, t, recs if recs is not None else records(6), out, hparams=hp, stats=st,
                           log=lambda *a: None, **kw)


@pytest.mark.parametrize("kw, needle", [
    (dict(batch_size=0), "batch_size must be >= 1"), (dict(batch_size=7), "batch_size=7 is larger than the 6 records"),
    (dict(eval_every=0), "eval_every must be >= 1"), (dict(eval_every=-1), "eval_every must be >= 1"),
    (dict(eval_batch_size=0), "eval_batch_size must be >= 1"), (dict(time_budget=-1.0), "time_budget"),
    (dict(batch_size=2.5), "batch_size must be an integer"),
])
def test_lifelong_refuses_bad_settings_before_anything_is_written(setup, tmp_path, kw, needle):
    m, t, st = setup
    w0 = weights(m)
    with pytest.raises((ValueError, TypeError), match=needle):
        _lifelong(m, t, st, tmp_path / "run", **kw)
    assert not (tmp_path / "run").exists() and same(m, w0)


def test_lifelong_refuses_rome_batches_and_missing_stats_layers(setup, tmp_path):
    m, t, st = setup
    with pytest.raises(ValueError, match="ROME edits one fact at a time: batch_size must be 1"):
        _lifelong(m, t, st, tmp_path / "r", hparams=ue.HParams.for_model(m, "rome"))
    with pytest.raises(ValueError, match=r"stats lack the edited layer\(s\) \[1\]"):
        _lifelong(m, t, {0: st[0]}, tmp_path / "s", hparams=ue.HParams.for_model(m, "encore", layers=[0, 1]))
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_lifelong_warns_about_records_left_out(setup, tmp_path):
    m, t, st = setup
    with pytest.warns(UserWarning, match="1 of the 5 records do not fill a last batch of 2"):
        run = _lifelong(m, t, st, tmp_path / "run", recs=records(5), eval_every=4)
    assert run.complete and run.checkpoints[-1]["n_edits"] == 4


def _comparable(log: dict) -> dict:
    "A lifelong log without its timings."
    drop = lambda d: {k: (drop(v) if isinstance(v, dict) else v) for k, v in d.items() if not k.startswith("seconds")}
    return {k: ([drop(r) for r in v] if isinstance(v, list) else drop(v) if isinstance(v, dict) else v)
            for k, v in log.items()}


class _Killed(BaseException):
    "Stands for the process being killed (BaseException: no handler of the code under test catches it)."


@pytest.mark.parametrize("method", ["encore", "alphaedit"])
def test_lifelong_killed_at_every_write_resumes_to_the_same_log(setup, tmp_path, monkeypatch, method):
    """The run is killed before each of its writes in turn (the n-th write of a state or of the log) and then resumed;
    every resumed run ends with the log, state and history of an uninterrupted one."""
    m, t, st = setup
    hp = ue.HParams.for_model(m, method, v_num_grad_steps=STEPS, **({"nullspace_relative": 0.3} if method == "alphaedit" else {}))
    w0 = weights(m)
    ref = _lifelong(m, t, st, tmp_path / "ref", hparams=hp)
    ref_log = json.loads((tmp_path / "ref" / "log.json").read_text())
    from unifiededit.store import load_tensors
    ref_state = load_tensors(tmp_path / "ref" / "state.safetensors")[0]
    real_json, real_tensors = ll.write_json_atomic, ll.save_tensors
    n_writes = 1 + 2 * 3                                    # the pre-evaluation, then state + log for 3 batches
    for k in range(n_writes):
        out = tmp_path / f"killed{k}"
        count = [0]
        def counted(real):
            def write(*a, **kw):
                if count[0] == k: raise _Killed()
                count[0] += 1
                return real(*a, **kw)
            return write
        monkeypatch.setattr(ll, "write_json_atomic", counted(real_json))
        monkeypatch.setattr(ll, "save_tensors", counted(real_tensors))
        with pytest.raises(_Killed):
            _lifelong(m, t, st, out, hparams=hp)
        assert same(m, w0)                                  # the caller's model is unedited even then
        monkeypatch.setattr(ll, "write_json_atomic", real_json)
        monkeypatch.setattr(ll, "save_tensors", real_tensors)
        run = _lifelong(m, t, st, out, hparams=hp)
        assert run.complete, k
        assert _comparable(json.loads((out / "log.json").read_text())) == _comparable(ref_log), k
        state = load_tensors(out / "state.safetensors")[0]
        assert set(state) == set(ref_state) and all(torch.equal(state[n], ref_state[n]) for n in state), k
        assert same(m, w0)


def test_lifelong_refuses_other_records_with_the_same_case_ids(setup, tmp_path):
    m, t, st = setup
    _lifelong(m, t, st, tmp_path / "run", recs=records(4), eval_every=4)
    with pytest.raises(ValueError, match="holds another lifelong run"):
        _lifelong(m, t, st, tmp_path / "run", recs=records(4, prompt="The best known example is {}"), eval_every=4)


def test_lifelong_refuses_a_state_of_another_run(setup, tmp_path):
    m, t, st = setup
    _lifelong(m, t, st, tmp_path / "a", recs=records(4), eval_every=4)
    _lifelong(m, t, st, tmp_path / "b", recs=records(4, start=10), eval_every=4)
    shutil.copy(tmp_path / "b" / "state.safetensors", tmp_path / "a" / "state.safetensors")
    with pytest.raises(ValueError, match="belongs to another run"):
        _lifelong(m, t, st, tmp_path / "a", recs=records(4), eval_every=4)


# ---------------------------------------------------------------- sweeps
def _sweep(m, t, st, out, recs, **kw):
    kw = {"methods": ("emmet",), "batch_sizes": (2,), "layer_modes": ("single",), "stats": st, "value_cache": None,
          "overrides": {"v_num_grad_steps": STEPS}, "progress": False, "log": None, **kw}
    return sw.run_sweep(m, t, recs, out, **kw)


def test_sweep_refuses_other_records_with_the_same_case_ids(setup, tmp_path):
    m, t, st = setup
    _sweep(m, t, st, tmp_path / "s", records(4))
    with pytest.raises(ValueError, match="holds results of these settings on other records"):
        _sweep(m, t, st, tmp_path / "s", records(4, prompt="The best known example is {}"))
    with pytest.raises(ValueError, match="holds results of other records with the same case_ids"):   # another grid
        _sweep(m, t, st, tmp_path / "s", records(4, prompt="The best known example is {}"), methods=("memit",))
    assert not (tmp_path / "s" / "memit-single-B2").exists() or not list((tmp_path / "s" / "memit-single-B2").glob("batch_*"))


@pytest.mark.parametrize("sequential", [False, True])
def test_sweep_refuses_another_sample_in_a_configuration(setup, tmp_path, sequential):
    m, t, st = setup
    _sweep(m, t, st, tmp_path / "s", records(8), sequential=sequential)
    with pytest.raises(ValueError, match="holds results of these settings on other records \\(batch 0 differs"):
        _sweep(m, t, st, tmp_path / "s", records(4, start=100), sequential=sequential)
    run = _sweep(m, t, st, tmp_path / "s", records(8), max_batches=2, sequential=sequential)   # a shorter plan: fine
    assert run.complete and run.n_new == 0


@pytest.mark.parametrize("kw, needle", [
    (dict(max_batches=0), "max_batches must be >= 1"), (dict(batch_sizes=(2.7,)), "batch size must be an integer"),
    (dict(batch_sizes=(0,)), "batch size must be >= 1"), (dict(time_budget=-1.0), "time_budget"),
    (dict(eval_batch_size=0), "eval_batch_size must be >= 1"), (dict(batch_sizes=()), "non-empty list"),
])
def test_sweep_refuses_bad_numbers_before_anything_is_written(setup, tmp_path, kw, needle):
    m, t, st = setup
    with pytest.raises((ValueError, TypeError), match=needle):
        _sweep(m, t, st, tmp_path / "s", records(4), **kw)
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- the command line
def _refused(argv) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try: code = main(argv)
        except SystemExit as e: code = e.code
    assert code == 2, (argv, err.getvalue())
    return err.getvalue()


def _with_base(argv: list, tmp_path) -> list:
    "`argv` completed with the options its command requires (valid ones), except those `argv` gives itself."
    base = {"sweep": ["--data", "sample:counterfact-500", "--out", str(tmp_path / "o")],
            "lifelong": ["--data", "sample:counterfact-500", "--out", str(tmp_path / "o"), "--corpus",
                         "sample:wikitext-2-test"],
            "edit": ["--model", "m", "--prompt", "{} is in", "--subject", "X", "--target", "Y"], "demo": []}[argv[0]]
    given = {a for a in argv[1:] if a.startswith("--")}
    pairs = [base[i:i + 2] for i in range(0, len(base), 2)]
    return [argv[0], *[x for pair in pairs if pair[0] not in given for x in pair], *argv[1:]]


@pytest.mark.parametrize("argv, needle", [
    (["sweep", "--batch-sizes", "0,4"], "expected integers >= 1, got '0,4'"),
    (["sweep", "--methods", "foo"], "unknown name 'foo'"),
    (["sweep", "--methods", "alphaedit"], "unknown name 'alphaedit'"),
    (["sweep", "--layer-modes", "weird"], "unknown name 'weird'"),
    (["sweep", "--multi-layers", "x"], "expected comma-separated integers"),
    (["sweep", "--max-batches", "0"], "expected an integer >= 1"),
    (["sweep", "--single-layer", "-1"], "expected an integer >= 0"),
    (["sweep", "--emmet-lambda", "-1"], ">= 0"),
    (["sweep", "--mom2-update-weight", "0"], "> 0"),
    (["sweep", "--time-budget", "-5"], ">= 0"),
    (["sweep", "--eval-batch-size", "0"], "expected an integer >= 1"),
    (["sweep", "--corpus", "/nonexistent.txt"], "no file at '/nonexistent.txt'"),
    (["lifelong", "--methods", "memit,foo"], "unknown name 'foo'"),
    (["lifelong", "--methods", "rome:bogus"], "rome takes no variant 'bogus'"),
    (["lifelong", "--eval-every", "0"], "expected an integer >= 1"),
    (["lifelong", "--n-records", "0"], "expected an integer >= 1"),
    (["lifelong", "--batch-size", "0"], "expected an integer >= 1"),
    (["lifelong", "--ppl-text", "/nonexistent.txt"], "no file at"),
    (["lifelong", "--layers", "x"], "expected comma-separated integers"),
    (["edit", "--prompt", "no placeholder"], "exactly one '{}'"),
    (["edit", "--prompt", "{} and {}"], "exactly one '{}'"),
    (["edit", "--prompt", "{0} is {x}"], "exactly one '{}'"),
    (["edit", "--target", " "], "target_new"),
    (["edit", "--layers", "a,b"], "expected comma-separated integers"),
    (["edit", "--max-new-tokens", "-3"], "expected an integer >= 1"),
    (["edit", "--hparams", "/nonexistent.json"], "no file at"),
    (["demo", "--corpus", "/nonexistent.txt"], "no file at"),
])
def test_cli_checks_every_option_before_loading_anything(argv, needle, monkeypatch, tmp_path):
    import unifiededit.pretrained as pre
    monkeypatch.setattr(pre, "load_pretrained", lambda *a, **k: pytest.fail(f"loaded a model for {argv}"))
    assert needle in _refused(_with_base(argv, tmp_path))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the second probe
def test_an_interrupted_apply_puts_back_what_it_wrote(setup, monkeypatch):
    m, t, st = setup
    import unifiededit.history as hist
    e = ue.edit(m, t, [REQ], method="memit", layers=[1, 2], stats=st, progress=False, v_num_grad_steps=STEPS)
    e.revert()
    w0, real, n = weights(m), hist.write_delta, [0]
    def second_fails(*a, **k):
        n[0] += 1
        if n[0] == 2: raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(hist, "write_delta", second_fails)
    with pytest.raises(KeyboardInterrupt):
        e.apply()
    assert same(m, w0) and not e.applied
    monkeypatch.setattr(hist, "write_delta", real)
    e.apply().revert()
    assert same(m, w0)


def test_lifelong_refuses_duplicate_ids_and_a_string_of_text(setup, tmp_path):
    m, t, st = setup
    r = records(4)
    dup = [r[0], r[1], EditRecord(0, "Steve Jobs", r[0].prompt, "Apple", "Paris"), r[3]]
    with pytest.raises(ValueError, match="duplicate case_ids"):
        _lifelong(m, t, st, tmp_path / "a", recs=dup)
    with pytest.raises(TypeError, match="ppl_texts must be a list of strings, not a single string"):
        _lifelong(m, t, st, tmp_path / "b", recs=r, ppl_texts=_TINY_TEXT)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    run = _lifelong(m, t, st, tmp_path / "c", recs=r, ppl_texts=(x for x in [_TINY_TEXT]), eval_every=4)
    assert "perplexity" in run.pre                                   # a generator is read once, as a list


def test_lifelong_never_writes_over_a_log_it_cannot_read(setup, tmp_path):
    m, t, st = setup
    out = tmp_path / "run"
    _lifelong(m, t, st, out, recs=records(4), eval_every=4)
    damaged = (out / "log.json").read_text()[:200]
    (out / "log.json").write_text(damaged)
    with pytest.raises(ValueError, match="log.json is unreadable .* while state.safetensors holds edited weights"):
        _lifelong(m, t, st, out, recs=records(4), eval_every=4)
    assert (out / "log.json").read_text() == damaged
    (out / "log.json").unlink()
    with pytest.raises(ValueError, match="log.json is missing while state.safetensors"):
        _lifelong(m, t, st, out, recs=records(4), eval_every=4)


def test_lifelong_refuses_a_log_edited_by_hand(setup, tmp_path):
    m, t, st = setup
    out = tmp_path / "run"
    _lifelong(m, t, st, out)
    log = json.loads((out / "log.json").read_text()); log["batches"].pop()
    (out / "log.json").write_text(json.dumps(log))
    with pytest.raises(ValueError, match="edited by hand"):
        _lifelong(m, t, st, out)


def test_a_sequential_sweep_does_not_reuse_a_batch_evaluated_for_another_plan(setup, tmp_path):
    "With sequential_eval='batch' the last batch is scored on every edit so far: a longer plan cannot reuse it."
    m, t, st = setup
    kw = dict(sequential=True, sequential_eval="batch")
    ref = _sweep(m, t, st, tmp_path / "ref", records(8), **kw)
    _sweep(m, t, st, tmp_path / "mb", records(8), max_batches=2, **kw)
    with pytest.raises(FileNotFoundError, match="overwrite=True"):
        _sweep(m, t, st, tmp_path / "mb", records(8), **kw)
    _sweep(m, t, st, tmp_path / "mb", records(8), overwrite=True, **kw)
    for b in range(4):
        f = lambda d: json.loads((tmp_path / d / "emmet-single-B2-seq" / f"batch_{b:05d}.json").read_text())
        assert f("mb")["evaluated_after_edits"] == f("ref")["evaluated_after_edits"] == (8 if b == 3 else 2)
    assert ref.complete


def test_fetch_refuses_a_damaged_record_an_html_page_and_odd_names(tmp_path):
    import http.server, threading
    from unifiededit.datafiles import CorruptFile, fetch
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html>please log in</html>" if self.path.endswith("page.json") else b"[1, 2, 3]"
            self.send_response(200)
            self.send_header("Content-Type", "text/html" if self.path.endswith("page.json") else "application/json")
            self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        p = fetch("a.json", tmp_path, base_url=url)
        rec = tmp_path / "a.json.sha256.json"
        rec.write_text(rec.read_text()[:20])
        with pytest.raises(CorruptFile, match="the checksum record of a.json, is damaged"):
            fetch("a.json", tmp_path, base_url=url)
        with pytest.raises(ConnectionError, match="HTML page"):
            fetch("page.json", tmp_path, base_url=url)
        assert not (tmp_path / "page.json").exists()
        for bad in ("..", ".hidden", "a.json.sha256.json", "a.json?x=1", "a b.json", "a#b"):
            with pytest.raises(ValueError, match="plain file name"):
                fetch(bad, tmp_path, base_url=url)
        (tmp_path / "f").write_text("x")
        with pytest.raises(ValueError, match="is not a folder"):
            fetch("a.json", tmp_path / "f", base_url=url)
        with pytest.raises(ValueError, match="timeout must be > 0"):
            fetch("b.json", tmp_path, base_url=url, timeout=-1)
        assert p.read_text() == "[1, 2, 3]"
    finally:
        srv.shutdown(); srv.server_close()


def test_sample_references_are_of_the_right_kind(tmp_path, monkeypatch):
    from unifiededit.corpus import as_corpus
    from unifiededit.datafiles import data_path, sample_path
    with pytest.raises(ValueError, match="'sample:zsre-1k' holds records, not text: use sample:wikitext-2-test"):
        as_corpus("sample:zsre-1k")
    with pytest.raises(ValueError, match="holds text, not records"):
        load_dataset("sample:wikitext-2-test")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample:zsre-1k").write_text("[]")
    with pytest.warns(UserWarning, match="names the bundled sample, not the file of that name"):
        assert data_path("sample:zsre-1k") == sample_path("zsre-1k")


@pytest.mark.parametrize("argv, needle", [
    (["sweep", "--out", ""], "expected a folder, got an empty string"),
    (["sweep", "--out", "FILE"], "is a file, not a folder"),
    (["sweep", "--out", "FILE/sub"], "is a file, not a folder"),
    (["sweep", "--cache-dir", "FILE"], "is a file, not a folder"),
    (["sweep", "--plot", "DIR"], "is a folder, not a file"),
    (["sweep", "--seed", "-1"], "expected an integer >= 0"),
    (["sweep", "--corpus", "BINARY"], "is not UTF-8 text"),
    (["sweep", "--corpus", "sample:zsre-1k"], "holds records, not text"),
    (["sweep", "--batch-sizes", "99", "--n-records", "4"], "every batch size exceeds the 4 records"),
    (["lifelong", "--ppl-text", "EMPTY"], "is empty"),
    (["lifelong", "--out", ""], "expected a folder"),
    (["lifelong", "--batch-size", "8", "--n-records", "4"], "--batch-size 8 is larger than the 4 records"),
    (["edit", "--save", "DIR"], "is a folder, not a file"),
    (["edit", "--save", "FILE/x.safetensors"], "is a file, not a folder"),
    (["edit", "--hparams", "sample:zsre-1k"], "no file at 'sample:zsre-1k'"),
    (["edit", "--hparams", "NOTJSON"], "is not a valid JSON file"),
])
def test_cli_refuses_unusable_paths_and_numbers_before_loading(argv, needle, monkeypatch, tmp_path):
    import unifiededit.pretrained as pre
    (tmp_path / "FILE").write_text("x"); (tmp_path / "DIR").mkdir()
    (tmp_path / "BINARY").write_bytes(b"\xff\xfe\x00\x01" * 10); (tmp_path / "EMPTY").write_text("")
    (tmp_path / "NOTJSON.json").write_text("not json")
    names = {"FILE", "DIR", "BINARY", "EMPTY"}
    argv = [str(tmp_path / a) if a in names else str(tmp_path / "NOTJSON.json") if a == "NOTJSON" else
            str(tmp_path / "FILE" / a.split("/", 1)[1]) if a.startswith("FILE/") else a for a in argv]
    monkeypatch.setattr(pre, "load_pretrained", lambda *a, **k: pytest.fail(f"loaded a model for {argv}"))
    assert needle in _refused(_with_base(argv, tmp_path))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the third probe
def test_a_list_of_file_names_is_not_read_as_text(tmp_path):
    from unifiededit.corpus import as_corpus
    f = tmp_path / "corpus.txt"; f.write_text(_TINY_TEXT)
    with pytest.raises(ValueError, match="corpus item 0 .* names a file"):
        as_corpus([str(f)])
    with pytest.raises(TypeError, match="not a mapping"):
        as_corpus({"a": "b"})
    assert as_corpus([f]).description.startswith("file corpus.txt")          # Path objects are files
    assert len(list(as_corpus(["x" * 5000]))) == 1                           # a long text is a text


def test_rome_key_switches_must_be_booleans():
    with pytest.raises((TypeError, ValueError), match="enable_random_prefix_keys must be True or False, got 'false'"):
        ue.HParams.from_dict({"layers": [1], "enable_prompt_keys": True, "enable_random_prefix_keys": "false"},
                             method="rome")


def test_the_history_follows_reverts_and_refuses_another_model(setup):
    m, t, st = setup
    h = ue.EditHistory()
    kw = dict(method="encore", layers=[0, 1], stats=st, history=h, progress=False, v_num_grad_steps=STEPS)
    e1 = ue.edit(m, t, [REQ], **kw)
    g1 = {l: h.gram(l).clone() for l in (0, 1)}
    e2 = ue.edit(m, t, [{**REQ, "subject": "Michael Jordan", "target_new": {"str": "Apple"}}], **kw)
    with pytest.raises(RuntimeError, match="revert those first"):
        e1.revert()
    e2.revert()
    assert h.counts == {0: 1, 1: 1} and all(torch.equal(h.gram(l), g1[l]) for l in (0, 1))
    e1.revert()
    assert (h.grams, h.counts) == ({}, {})
    e1.apply()
    assert h.counts == {0: 1, 1: 1} and all(torch.equal(h.gram(l), g1[l]) for l in (0, 1))
    e1.revert()
    big = tiny_model("llama", initializer_range=0.1, intermediate_size=256)
    wb = weights(big)
    st_big = collect_key_stats(big, t, [0, 1], [_TINY_TEXT], n_tokens=500, max_length=64, progress=False)
    h.add(0, torch.ones(128, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="history holds keys of another size at layer\\(s\\) \\[0\\]"):
        ue.edit(big, t, [REQ], method="encore", layers=[0, 1], stats=st_big, history=h, progress=False)
    assert same(big, wb)


def test_alphaedit_thresholds_that_preserve_nothing(setup):
    m, t, st = setup
    with pytest.raises(ValueError, match="nullspace_relative=2.0 must be < 1"):
        ue.HParams(method="alphaedit", layers=[0, 1], nullspace_relative=2.0)
    from unifiededit.general import nullspace
    with pytest.warns(UserWarning, match="the projector is the identity"):
        nullspace(st[0].mom2, 1e9)


def test_hparams_files_and_fields(tmp_path):
    y = tmp_path / "x.yaml"
    y.write_text("alg_name: MEMIT\nlayers: [1]\nv_lr: 5e-1\nclamp_norm_factor: 1e+1\nmom2_update_weight: 15000\n")
    hp = ue.HParams.from_file(y)
    assert (hp.v_lr, hp.clamp_norm_factor, hp.mom2_update_weight) == (0.5, 10.0, 15000)
    (tmp_path / "b.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="b.json is not UTF-8 text"):
        ue.HParams.from_file(tmp_path / "b.json", method="memit")
    for kw, needle in ((dict(seed=2 ** 70), "seed must be < 2\\*\\*63"), (dict(rewrite_module_tmp=5), "rewrite_module_tmp must be a str"),
                       (dict(mom2_dataset=5), "mom2_dataset must be a str"), (dict(meta="x"), "meta must be a dict")):
        with pytest.raises((ValueError, TypeError), match=needle):
            ue.HParams(method="memit", layers=[1], **kw)


def test_collect_key_stats_names_bad_layers_and_corpora(setup, tmp_path):
    m, t, _ = setup
    for layers, needle in ((None, "layers must be an int or a list"), ("1", "layers must be an int or a list"),
                           ([1.0], "layers must hold ints, got 1.0")):
        with pytest.raises(TypeError, match=needle):
            collect_key_stats(m, t, layers, [_TINY_TEXT], n_tokens=100, progress=False)
    with pytest.raises(ValueError, match="is a folder"):
        collect_key_stats(m, t, [1], tmp_path, n_tokens=100, progress=False)


def test_a_malformed_value_cache_entry_is_recomputed(setup, tmp_path):
    import glob
    from unifiededit.store import load_tensors, save_tensors
    from unifiededit.value_cache import cached_target_values
    m, t, _ = setup
    hp = ue.HParams.for_model(m, "emmet", layers=[1], v_num_grad_steps=2)
    tpl = hp.key_config.templates(m, t)
    get = lambda: cached_target_values(m, t, [REQ], 1, tpl, hp.value_config, hook="rewrite", cache=tmp_path / "vc")
    first = get()
    (path,) = glob.glob(str(tmp_path / "vc" / "**" / "*.safetensors"), recursive=True)
    T, M = load_tensors(path)
    for bad in ({k: v for k, v in T.items() if k != "h"}, {**T, "delta": T["delta"][:5]}):
        save_tensors(path, bad, M)
        with pytest.warns(UserWarning, match="unusable entry"):
            again = get()
        assert torch.equal(again.delta, first.delta)


def test_saved_files_of_the_wrong_shape_are_refused(tmp_path):
    from unifiededit.store import load_tensors, save_tensors
    h = ue.EditHistory(); h.add(1, torch.ones(4, 2, dtype=torch.float64))
    T, M = h.to_tensors()
    for tensors, meta, needle in ((T, {**M, "counts": {"1": 2, "3": 1}}, "do not match its Gram matrices"),
                                  ({**T, "gram.x": T["gram.1"].clone()}, M, "not a well-formed EditHistory"),
                                  ({"gram.1": T["gram.1"].float()}, M, "square float64")):
        save_tensors(tmp_path / "h.safetensors", tensors, meta)
        with pytest.raises(ValueError, match=needle):
            ue.EditHistory.load(tmp_path / "h.safetensors")
    e = Edit("emmet", {1: torch.zeros(2, 3)}, {1: "m.layers.1.mlp.down_proj"})
    T, M = load_tensors(e.save(tmp_path / "e.safetensors"))
    save_tensors(tmp_path / "e.safetensors", {**T, "extra": torch.zeros(1)}, M)
    with pytest.raises(ValueError, match="holds tensors \\['extra'\\] besides its deltas"):
        Edit.load(tmp_path / "e.safetensors")
    with pytest.raises(TypeError, match="case_id must be an int, a str or None"):
        ue.EditRequest("{} is", "X", "Y", case_id=object())


def test_cli_does_not_overwrite_a_saved_edit_and_reports_type_errors(tmp_path):
    (tmp_path / "e.safetensors").write_text("an earlier edit")
    assert "exists: choose another name" in _refused(_with_base(["edit", "--save", str(tmp_path / "e.safetensors")], tmp_path))
    y = tmp_path / "h.yaml"; y.write_text("alg_name: MEMIT\nlayers: [1]\nv_lr: fast\n")
    import unifiededit.pretrained as pre
    m, t = tiny_model("llama", initializer_range=0.1), tiny_tokenizer("sentencepiece")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pre, "load_pretrained", lambda *a, **k: (m, t))
        assert "v_lr must be a number" in _refused(_with_base(["edit", "--hparams", str(y)], tmp_path))


def test_cli_lifelong_interrupted_says_how_to_go_on(tmp_path, monkeypatch):
    import unifiededit.pretrained as pre
    m, t = tiny_model("llama", initializer_range=0.1), tiny_tokenizer("sentencepiece")
    monkeypatch.setattr(pre, "load_pretrained", lambda *a, **k: (m, t))
    monkeypatch.setattr(ll, "run_lifelong", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main(_with_base(["lifelong", "--methods", "memit", "--n-records", "4", "--batch-size", "2", "--n-tokens", "500"],
                        tmp_path))
    assert e.value.code == 130 and "run the same command again to continue" in out.getvalue()
