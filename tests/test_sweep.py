"""The batch-size sweep (`unifiededit.sweep`) on a tiny random Llama: resuming after an interruption, the on-disk
target-value cache, bit-exact weight restoration between batches, sequential accumulation, and aggregation that
reports non-finite values instead of averaging them."""
import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import unifiededit.sweep as sw
from unifiededit.store import tokenizer_fingerprint
from unifiededit.sweep_results import load_sweep
from unifiededit.value_cache import ValueCache, cached_target_values, model_key
from unifiededit.data import EditRecord
from unifiededit.editing import edit
from unifiededit.hparams import HParams
from unifiededit.keys import ContextTemplates
from unifiededit.models import ModelAdapter
from unifiededit.tiny import _TINY_TEXT, tiny_model, tiny_tokenizer
from unifiededit.stats import collect_key_stats
from unifiededit.batched_values import compute_target_values

STEPS = 6                      # Adam steps per target value: enough to move, fast on a tiny model
LAYER = 1                      # HParams.for_model(tiny llama, 'emmet').layers == [1]


def make_records(n=4):
    "CounterFact-shaped records whose subject ends the prompt (a random model only reacts where it predicts)."
    subjects = ["The Eiffel Tower", "LeBron James", "Danielle Darrieux", "Toko Yasuda", "Thomas Joannes Stieltjes"]
    targets = ["Rome", "football", "English", "piano", "Dutch"]
    return [EditRecord(i, s, "The answer to the question is {}", targets[i], "Paris",
                       paraphrase_prompts=(f"We now know the answer is {s}",),
                       neighborhood_prompts=("The answer to the question is Mars",), neighborhood_answers=("Paris",))
            for i, s in enumerate(subjects[:n])]


@pytest.fixture(scope="module")
def setup():
    m = tiny_model("llama", initializer_range=0.1)
    t = tiny_tokenizer("sentencepiece")
    st = collect_key_stats(m, t, [0, 1], [_TINY_TEXT], n_tokens=1000, max_length=64, progress=False)
    return m, t, st


def sweep_kw(st, values_dir, **over):
    kw = dict(methods=("emmet", "memit"), batch_sizes=(1, 2), layer_modes=("single",), stats=st,
              value_cache=values_dir, overrides={"v_num_grad_steps": STEPS}, progress=False, log=None)
    kw.update(over)
    return kw


def weights(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def same_weights(m, w):
    return all(torch.equal(p, w[n]) for n, p in m.named_parameters())


def rewrite_weight(m, layer=LAYER):
    return ModelAdapter.from_model(m).module("rewrite", layer).weight


def batch_jsons(d):
    "{relative path: batch JSON without its timings} of a sweep folder."
    out = {}
    for p in sorted(d.glob("*/batch_*.json")):
        b = json.loads(p.read_text())
        b.pop("seconds")
        out[str(p.relative_to(d))] = b
    return out


class FailOnCall:
    "Wraps `evaluate` so that its n-th call raises (a crash or Ctrl-C in the middle of a batch, after the edit)."
    def __init__(self, n, exc=KeyboardInterrupt):
        self.n, self.exc, self.calls, self.real = n, exc, 0, sw.evaluate

    def __call__(self, *a, **k):
        self.calls += 1
        if self.calls == self.n: raise self.exc("simulated interruption")
        return self.real(*a, **k)


def emmet_hp(m, **over):
    return HParams.for_model(m, "emmet", v_num_grad_steps=STEPS, layers=[LAYER], **over)


# ---------------------------------------------------------------------------------------------- resume

def test_resume_after_interrupt_skips_finished_batches(setup, tmp_path, monkeypatch):
    m, t, st = setup
    w0 = weights(m)
    recs = make_records(4)
    clean = sw.run_sweep(m, t, recs, tmp_path / "clean", **sweep_kw(st, tmp_path / "values"))
    assert clean.complete and clean.n_new == 12           # emmet & memit x (4 batches of 1 + 2 batches of 2)

    # calls to evaluate: 1 = pre-edit, 2.. = batches; the 4th call is batch 3, interrupted after its edit
    monkeypatch.setattr(sw, "evaluate", FailOnCall(4))
    with pytest.raises(KeyboardInterrupt):
        sw.run_sweep(m, t, recs, tmp_path / "run", **sweep_kw(st, tmp_path / "values"))
    monkeypatch.undo()
    assert same_weights(m, w0), "the interrupted batch's edit was not reverted"
    done = sorted((tmp_path / "run").glob("*/batch_*.json"))
    assert [p.parent.name + "/" + p.name for p in done] == ["emmet-single-B1/batch_00000.json",
                                                            "emmet-single-B1/batch_00001.json"]
    before = {p: p.read_bytes() for p in done}

    resumed = sw.run_sweep(m, t, recs, tmp_path / "run", **sweep_kw(st, tmp_path / "values"))
    assert (resumed.n_existing, resumed.n_new, resumed.complete) == (2, 10, True)
    assert all(p.read_bytes() == b for p, b in before.items()), "finished batches were rewritten"
    assert batch_jsons(tmp_path / "run") == batch_jsons(tmp_path / "clean")
    assert same_weights(m, w0)

    again = sw.run_sweep(m, t, recs, tmp_path / "run", **sweep_kw(st, tmp_path / "values"))
    assert (again.n_existing, again.n_new) == (12, 0)


def test_corrupt_or_foreign_batch_file_is_recomputed(setup, tmp_path):
    m, t, st = setup
    recs = make_records(2)
    kw = sweep_kw(st, tmp_path / "values", methods=("emmet",), batch_sizes=(1,))
    sw.run_sweep(m, t, recs, tmp_path / "run", **kw)
    ref = batch_jsons(tmp_path / "run")
    f0 = tmp_path / "run" / "emmet-single-B1" / "batch_00000.json"
    f0.write_text(f0.read_text()[:50])                                   # truncated
    f1 = tmp_path / "run" / "emmet-single-B1" / "batch_00001.json"
    b1 = json.loads(f1.read_text()); b1["case_ids"] = [99]; f1.write_text(json.dumps(b1))   # not these records
    with pytest.warns(UserWarning, match="not valid JSON"):
        run = sw.run_sweep(m, t, recs, tmp_path / "run", **kw)
    assert (run.n_existing, run.n_new) == (0, 2)
    assert batch_jsons(tmp_path / "run") == ref


def test_different_settings_in_same_folder_is_an_error(setup, tmp_path):
    m, t, st = setup
    recs = make_records(2)
    kw = sweep_kw(st, tmp_path / "values", methods=("emmet",), batch_sizes=(1,))
    sw.run_sweep(m, t, recs, tmp_path / "run", **kw)
    kw["overrides"] = {"v_num_grad_steps": STEPS + 1}
    with pytest.raises(ValueError, match="different settings.*hparams"):
        sw.run_sweep(m, t, recs, tmp_path / "run", **kw)
    run = sw.run_sweep(m, t, recs, tmp_path / "run", overwrite=True, **kw)
    assert (run.n_existing, run.n_new) == (0, 2)


def test_time_budget_stops_cleanly_and_rerun_continues(setup, tmp_path):
    m, t, st = setup
    recs = make_records(2)
    kw = sweep_kw(st, tmp_path / "values", methods=("emmet",), batch_sizes=(1,))
    run = sw.run_sweep(m, t, recs, tmp_path / "run", time_budget=0.0, **kw)
    assert not run.complete and run.stopped and run.n_new == 0
    run = sw.run_sweep(m, t, recs, tmp_path / "run", **kw)
    assert run.complete and run.n_new == 2


# ---------------------------------------------------------------------------------------------- value cache

def test_value_cache_hit_is_identical_and_corrupt_entry_is_recomputed(setup, tmp_path):
    m, t, _ = setup
    hp = emmet_hp(m)
    reqs = [r.request for r in make_records(3)]
    tmpl = ContextTemplates([["{}"], ["A fact. {}"]])
    cache = ValueCache(tmp_path)
    tv1 = cached_target_values(m, t, reqs, LAYER, tmpl, hp.value_config, hook="rewrite", cache=cache)
    direct = compute_target_values(m, t, reqs, LAYER, tmpl, hook="rewrite", v_num_grad_steps=STEPS, progress=False)
    for k in ("delta", "h", "loss_history", "prob_final", "n_steps"):
        assert torch.equal(getattr(tv1, k), getattr(direct, k)), k
    assert (cache.computed, cache.hits) == (3, 0)

    tv2 = cached_target_values(m, t, reqs, LAYER, tmpl, hp.value_config, hook="rewrite", cache=cache)
    assert (cache.computed, cache.hits) == (3, 3)
    for k in ("delta", "h", "loss_init", "loss_final", "nll_final", "kl_final", "prob_init", "prob_final",
              "n_steps", "loss_history"):
        assert torch.equal(getattr(tv2, k), getattr(tv1, k)), k
    assert [r.subject for r in tv2.requests] == [r["subject"] for r in reqs]

    key = lambda r, **kw: cache.key(model_key(m), tokenizer_fingerprint(t), r, kw.get("layer", LAYER),
                                    "rewrite", kw.get("tmpl", tmpl), kw.get("hp", hp).value_config)
    p0, p1 = cache.path(key(reqs[0])), cache.path(key(reqs[1]))
    p0.write_bytes(p0.read_bytes()[: p0.stat().st_size // 2])                  # truncated file
    tensors = load_file(str(p1))                                               # well-formed, altered value
    tensors["delta"] = tensors["delta"] + 1.0
    from safetensors import safe_open
    with safe_open(str(p1), framework="pt") as f: meta = f.metadata()
    save_file(tensors, str(p1), metadata=meta)
    with pytest.warns(UserWarning, match="target-value cache: unusable entry"):
        tv3 = cached_target_values(m, t, reqs, LAYER, tmpl, hp.value_config, hook="rewrite", cache=cache)
    assert (cache.corrupt, cache.computed) == (2, 5)
    alone = compute_target_values(m, t, reqs[:2], LAYER, tmpl, hook="rewrite", v_num_grad_steps=STEPS, progress=False)
    assert torch.equal(tv3.delta[:2], alone.delta) and torch.equal(tv3.delta[2], tv1.delta[2])
    torch.testing.assert_close(tv3.delta, tv1.delta, rtol=1e-4, atol=1e-5)    # same values up to rounding
    cached_target_values(m, t, reqs, LAYER, tmpl, hp.value_config, hook="rewrite", cache=cache)
    assert cache.corrupt == 2 and cache.computed == 5                          # the rewritten entries are sound

    # everything a value depends on is in the key
    assert key(reqs[0]) != key(reqs[0], hp=hp.replace(v_lr=0.1))
    assert key(reqs[0]) != key(reqs[0], layer=0)
    assert key(reqs[0]) != key(reqs[0], tmpl=ContextTemplates([["{}"]]))
    m2 = copy.deepcopy(m)
    with torch.no_grad(): rewrite_weight(m2).add_(1e-3)
    assert model_key(m2) != model_key(m)


def test_edit_accepts_precomputed_values(setup):
    m, t, st = setup
    hp = emmet_hp(m)
    reqs = [r.request for r in make_records(3)]
    tmpl = ContextTemplates.generate(m, t, hp.context_template_length_params, seed=0)
    w0 = weights(m)
    e0 = edit(m, t, reqs, hparams=hp, stats=st, templates=tmpl, progress=False)
    e0.revert()
    e1 = edit(m, t, reqs, hparams=hp, stats=st, templates=tmpl, values=e0.values, progress=False)
    assert torch.equal(e1.deltas[LAYER], e0.deltas[LAYER]) and e1.diagnostics["values_precomputed"]
    e1.revert()
    with pytest.raises(ValueError, match="same order"):
        edit(m, t, reqs[::-1], hparams=hp, stats=st, templates=tmpl, values=e0.values, progress=False)
    with pytest.raises(ValueError, match="3 target values for 2 requests"):
        edit(m, t, reqs[:2], hparams=hp, stats=st, templates=tmpl, values=e0.values, progress=False)
    with pytest.raises(ValueError, match="layer 0"):
        edit(m, t, reqs, hparams=hp.replace(layers=[0]), stats=st, templates=tmpl, values=e0.values, progress=False)
    with pytest.raises(TypeError, match="TargetValues"):
        edit(m, t, reqs, hparams=hp, stats=st, templates=tmpl, values=e0.values.z, progress=False)
    assert same_weights(m, w0)


# ---------------------------------------------------------------------------------------------- weights

def test_weights_restored_bit_exactly_between_batches(setup, tmp_path):
    m, t, st = setup
    w0 = weights(m)
    recs = make_records(3)
    restored = []
    run = sw.run_sweep(m, t, recs, tmp_path / "run", on_batch=lambda r: restored.append(same_weights(m, w0)),
                       **sweep_kw(st, tmp_path / "values", methods=("emmet",), batch_sizes=(1,)))
    assert run.complete and restored == [True, True, True]
    # the last batch's update is exactly that of record 2 alone on the unedited model (nothing left over)
    hp = emmet_hp(m, emmet_lambda=0.0)
    tmpl = ContextTemplates.generate(m, t, hp.context_template_length_params, seed=0)
    tv = cached_target_values(m, t, [recs[2].request], LAYER, tmpl, hp.value_config, hook="rewrite",
                              cache=tmp_path / "values")
    e = edit(m, t, [recs[2].request], hparams=hp, stats=st, templates=tmpl, values=tv, progress=False)
    expected = float((rewrite_weight(m).double() - w0[_rewrite_name(m)].double()).norm())
    e.revert()
    b2 = json.loads((tmp_path / "run" / "emmet-single-B1" / "batch_00002.json").read_text())
    assert b2["diagnostics"]["layers"][str(LAYER)]["delta_norm"] == expected
    assert same_weights(m, w0)


def _rewrite_name(m):
    return ModelAdapter.from_model(m).name("rewrite", LAYER) + ".weight"


def test_rome_batches_are_sequential_single_edits(setup, tmp_path):
    m, t, st = setup
    w0 = weights(m)
    run = sw.run_sweep(m, t, make_records(2), tmp_path / "run",
                       **sweep_kw(st, tmp_path / "values", methods=("rome",), batch_sizes=(1, 2),
                                  layer_modes=("single", "multi")))
    assert run.complete and run.skipped == [("rome-multi", "ROME edits one layer; layer mode 'multi' has [0, 1]")]
    b = json.loads((tmp_path / "run" / "rome-single-B2" / "batch_00000.json").read_text())
    assert len(b["diagnostics"]["layers"][str(LAYER)]["per_edit_delta_norm"]) == 2
    assert same_weights(m, w0)


# ---------------------------------------------------------------------------------------------- sequential

def test_sequential_mode_accumulates_and_resumes(setup, tmp_path, monkeypatch):
    m, t, st = setup
    w0 = weights(m)
    recs = make_records(3)
    states, evaluated = [], []

    def grab(r):
        states.append(rewrite_weight(m).detach().clone())
        evaluated.append([x["case_id"] for x in r["records"]])

    kw = sweep_kw(st, tmp_path / "values", methods=("emmet",), batch_sizes=(1,), sequential=True)
    run = sw.run_sweep(m, t, recs, tmp_path / "seq", on_batch=grab, **kw)
    assert run.complete and same_weights(m, w0)
    assert evaluated == [[0], [0, 1], [0, 1, 2]]                               # every record edited so far
    W = [w0[_rewrite_name(m)]] + states
    assert all(not torch.equal(W[b], W[b + 1]) for b in range(3))
    # batch b's update is an edit of record b computed on the model carrying batches 0..b-1
    hp = emmet_hp(m, emmet_lambda=0.0)
    tmpl = ContextTemplates.generate(m, t, hp.context_template_length_params, seed=0)
    for b in range(3):
        with torch.no_grad(): rewrite_weight(m).copy_(W[b])
        tv = cached_target_values(m, t, [recs[b].request], LAYER, tmpl, hp.value_config, hook="rewrite",
                                     cache=tmp_path / "values")
        e = edit(m, t, [recs[b].request], hparams=hp, stats=st, templates=tmpl, values=tv, progress=False)
        assert torch.equal(rewrite_weight(m), W[b + 1]), f"batch {b} is not the edit of record {b} on batches 0..{b - 1}"
        e.revert()
    with torch.no_grad(): rewrite_weight(m).copy_(W[0])
    last = json.loads((tmp_path / "seq" / "emmet-single-B1-seq" / "batch_00002.json").read_text())
    cum = float((W[3].double() - W[0].double()).norm())
    assert last["diagnostics"]["cumulative_delta_norm"] == cum
    assert last["diagnostics"]["delta_norm"] == float((W[3].double() - W[2].double()).norm())

    # interrupted in batch 2 (evaluate calls: pre, batch 0, batch 1, batch 2), then resumed from the saved weights
    monkeypatch.setattr(sw, "evaluate", FailOnCall(4))
    with pytest.raises(KeyboardInterrupt):
        sw.run_sweep(m, t, recs, tmp_path / "seq2", **kw)
    monkeypatch.undo()
    assert same_weights(m, w0)
    assert sorted(p.name for p in (tmp_path / "seq2" / ".state" / "emmet-single-B1-seq").iterdir()) == \
        ["after_00001.safetensors"]
    run2 = sw.run_sweep(m, t, recs, tmp_path / "seq2", **kw)
    assert (run2.n_existing, run2.n_new) == (2, 1)
    assert batch_jsons(tmp_path / "seq2") == batch_jsons(tmp_path / "seq")
    assert same_weights(m, w0)


# ---------------------------------------------------------------------------------------------- aggregation

def test_aggregation_excludes_nonfinite_values_with_a_report(setup, tmp_path):
    m, t, st = setup
    run = sw.run_sweep(m, t, make_records(4), tmp_path / "run",
                       **sweep_kw(st, tmp_path / "values", methods=("emmet",), batch_sizes=(1,)))
    res = load_sweep(run.out_dir)
    ref = res.summary().set_index("config").loc["emmet-single-B1"]
    vals = [b["records"][0]["metrics"]["efficacy_magnitude"] for b in sorted(res.batches, key=lambda b: b["batch"])]
    # what `evaluate` reports for a record whose logits were non-finite, written the way the sweep writes it
    path = tmp_path / "run" / "emmet-single-B1" / "batch_00001.json"
    b = json.loads(path.read_text())
    run_like = type("R", (), {"records": [{"case_id": b["records"][0]["case_id"],
                                           "metrics": {**b["records"][0]["metrics"], "efficacy_magnitude": float("nan")},
                                           "nonfinite": {"efficacy_magnitude": "non-finite logits for 'x' -> 'y'"}}]})
    b["records"] = sw._slim_records(run_like)
    assert b["records"][0]["metrics"]["efficacy_magnitude"] is None
    sw.write_json_atomic(path, b)

    res = load_sweep(tmp_path / "run")
    s = res.summary().set_index("config").loc["emmet-single-B1"]
    good = [v for i, v in enumerate(vals) if i != 1]
    assert s["efficacy_magnitude"] == pytest.approx(sum(good) / 3, rel=1e-12)
    assert (s["efficacy_magnitude_n"], s["efficacy_magnitude_nonfinite"]) == (3, 1)
    assert s["efficacy_score"] == ref["efficacy_score"] and s["efficacy_score_n"] == 4     # the rest of it counts
    rep = res.nonfinite_report()
    assert rep[["config", "batch", "metric"]].values.tolist() == [["emmet-single-B1", 1, "efficacy_magnitude"]]
    assert "non-finite logits" in rep["reason"].iloc[0]
    frame = res.records_frame()
    assert math.isnan(frame.loc[(frame.batch == 1), "efficacy_magnitude"].iloc[0])
    assert all(math.isfinite(x) for x in res.summary()["efficacy_magnitude"])


def test_cli_sweep_parser_and_errors(tmp_path):
    from unifiededit.cli import build_parser, main
    a = build_parser().parse_args(["sweep", "--data", "sample:counterfact-500", "--out", "o", "--batch-sizes", "1,4,16"])
    assert (a.n_records, a.methods, a.layer_modes, a.sequential) == (64, "emmet,memit", "single,multi", False)
    assert a.batch_sizes == [1, 4, 16]
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--data", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and not (tmp_path / "o").exists()
