"""Tests of unifiededit.scores and unifiededit.metrics: batched scoring against an independent one-at-a-time
computation, metric definitions on hand-made probabilities, generation, summaries, and non-finite reporting."""
import json
import math

import numpy as np
import pytest
import torch

import unifiededit.metrics as M
from unifiededit.datafiles import sample_path
from unifiededit.data import EditDataset, EditRecord, TfidfStats, load_counterfact, load_easyedit_counterfact, load_zsre
from unifiededit.metrics import EditEvaluation, evaluate
from unifiededit.generation import (generation_entropy, ngram_entropy, sample_generations, tfidf_similarity,
    word_tokenize)
from unifiededit.scores import (TargetScore, encode_pair, harmonic_mean, mean_ci, prediction_agreement, prob_magnitude,
                                prob_success, score_targets, student_t_quantile, token_accuracy)
from unifiededit.tiny import tiny_model, tiny_tokenizer

FAMILIES = [("gpt2", "bpe"), ("llama", "sentencepiece")]
PAIRS = [("The Colosseum is located in", "Rome"), ("LeBron James plays the sport of", "football"),
         ("Toronto is a city in", "Canada"), ("Apple A5 was created by", "Microsoft Windows Server"),
         ("The mother tongue of Danielle Darrieux is", "French"), ("Paris", "is the capital of France"),
         ("nq question: who wrote hamlet?", "William Shakespeare"), ("In 1998, the company released", " a new product")]


@pytest.fixture(scope="module", params=FAMILIES, ids=[f for f, _ in FAMILIES])
def lm(request):
    family, kind = request.param
    return tiny_model(family), tiny_tokenizer(kind)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2"), tiny_tokenizer("bpe")


@pytest.fixture(scope="module")
def cf8():
    return load_counterfact(sample_path("counterfact-500")).sample(8, seed=0)


# ---------------------------------------------------------------- the independent reference computation
def one_at_a_time(model, tok, prompt, target):
    """Straightforward ROME-style scoring of a single pair: tokenize f"{prompt} {target}" with the tokenizer's own
    special tokens, check the prompt's tokens are a prefix, one unpadded forward pass, log-softmax in float64."""
    text = prompt + ("" if target.startswith(" ") else " ") + target
    p_ids = tok(prompt)["input_ids"]
    ids = tok(text)["input_ids"]
    assert ids[:len(p_ids)] == p_ids, "test pairs are chosen so that the prompt's tokens are a prefix"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    tgt = ids[len(p_ids):]
    lps = [logp[len(p_ids) + j - 1, t].item() for j, t in enumerate(tgt)]
    preds = [int(logits[len(p_ids) + j - 1].argmax()) for j in range(len(tgt))]
    return tgt, lps, preds


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batched_matches_one_at_a_time(lm, batch_size):
    model, tok = lm
    scores = score_targets(model, tok, PAIRS, batch_size=batch_size)
    for (p, t), s in zip(PAIRS, scores):
        tgt, lps, preds = one_at_a_time(model, tok, p, t)
        assert list(s.target_ids) == tgt and len(tgt) >= 1
        np.testing.assert_allclose(s.token_logprobs, lps, rtol=0, atol=1e-5)
        assert list(s.predicted_ids) == preds
        assert s.nll == pytest.approx(-np.mean(lps), abs=1e-5)
        assert (p, t) == (s.prompt, s.target)


def test_target_tokens_have_leading_space():
    bpe, sp = tiny_tokenizer("bpe"), tiny_tokenizer("sentencepiece")
    ids, n = encode_pair(bpe, "The Colosseum is located in", "Rome")
    assert bpe.convert_ids_to_tokens(ids[n:]) == ["ĠRome"] and ids == bpe("The Colosseum is located in Rome")["input_ids"]
    ids, n = encode_pair(sp, "The Colosseum is located in", "Rome")
    assert ids[0] == sp.bos_token_id and ids.count(sp.bos_token_id) == 1          # exactly one BOS, at the start
    assert sp.convert_ids_to_tokens(ids[n:])[0].startswith("▁")
    assert ids == sp("The Colosseum is located in Rome")["input_ids"]
    assert encode_pair(bpe, "X is in", " Rome") == encode_pair(bpe, "X is in", "Rome")
    with pytest.raises(ValueError, match="no token to condition on"):
        encode_pair(bpe, "", "Rome")
    with pytest.raises(ValueError, match="adds no token"):
        encode_pair(bpe, "X is in", "")


def test_score_targets_restores_training_mode(gpt2):
    model, tok = gpt2
    model.train()
    try:
        a = score_targets(model, tok, PAIRS[:2])
        assert model.training
        model.eval()
        b = score_targets(model, tok, PAIRS[:2])
        assert a == b                                  # dropout was off while scoring
    finally:
        model.eval()
    with pytest.raises(ValueError, match="batch_size"):
        score_targets(model, tok, PAIRS, batch_size=0)


# ---------------------------------------------------------------- metric definitions on hand-made probabilities
def nll(ps):
    return [-math.log(p) for p in ps]


def test_prob_success_and_magnitude():
    assert prob_success(nll([0.5, 0.2, 0.1]), nll([0.3, 0.4, 0.1])) == pytest.approx(1 / 3)   # a tie is no success
    assert prob_magnitude(nll([0.5, 0.2, 0.1]), nll([0.3, 0.4, 0.1])) == pytest.approx(0.0)
    assert prob_magnitude(nll([0.9, 0.6]), nll([0.05, 0.1])) == pytest.approx((0.85 + 0.5) / 2)
    assert math.isnan(prob_success([1.0, math.inf], [2.0, 2.0])) and math.isnan(prob_magnitude([math.nan], [1.0]))
    with pytest.raises(ValueError, match="equal-length"):
        prob_success([1.0], [1.0, 2.0])


def test_harmonic_mean():
    assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
    assert harmonic_mean([0.5, 0.0, 1.0]) == 0.0 and math.isnan(harmonic_mean([0.5, math.nan]))
    with pytest.raises(ValueError, match="non-negative"):
        harmonic_mean([0.5, -0.1])


def ts(target_ids, predicted_ids, logprobs=None, prompt="p", target="t"):
    return TargetScore(prompt, target, tuple(target_ids), tuple(logprobs or [-0.5] * len(target_ids)), tuple(predicted_ids))


def test_token_accuracy_and_agreement():
    assert token_accuracy([ts([1, 2, 3], [1, 9, 3]), ts([4], [4])]) == pytest.approx(0.75)
    assert math.isnan(token_accuracy([ts([1], [1], [math.nan])]))
    assert ts([1, 2], [1, 0]).token_accuracy == 0.5
    assert prediction_agreement(ts([1, 2, 3, 4], [5, 2, 7, 4]), ts([1, 2, 3, 4], [5, 2, 3, 0])) == 0.5
    with pytest.raises(ValueError, match="different targets"):
        prediction_agreement(ts([1], [1]), ts([2], [2]))


def test_ngram_entropy_hand_computed():
    # "a b a b a": bigrams {ab: 2, ba: 2} -> H2 = 1 bit; trigrams {aba: 2, bab: 1} -> H3 = log2(3) - 2/3
    assert ngram_entropy("a b a b a") == pytest.approx(0.5 * (2 / 3 * 1 + 4 / 3 * (math.log2(3) - 2 / 3)))
    assert ngram_entropy("w x y z") == pytest.approx(0.5 * (2 / 3 * math.log2(3) + 4 / 3 * 1))
    assert ngram_entropy("the the the the the") == 0.0 and ngram_entropy("") == 0.0
    assert ngram_entropy("a b a b a", tokenize=str.split) == ngram_entropy("a b a b a")
    assert generation_entropy(["a b a b a", "w x y z"]) == pytest.approx((ngram_entropy("a b a b a") + ngram_entropy("w x y z")) / 2)


def test_word_tokenize_nltk_conventions():
    # NLTK's documented example and outputs
    assert word_tokenize("Good muffins cost $3.88\nin New York.  Please buy me\ntwo of them.\n\nThanks.") == [
        'Good', 'muffins', 'cost', '$', '3.88', 'in', 'New', 'York', '.', 'Please', 'buy', 'me', 'two', 'of', 'them',
        '.', 'Thanks', '.']
    assert word_tokenize("They'll save and invest more.") == ['They', "'ll", 'save', 'and', 'invest', 'more', '.']
    assert word_tokenize("hi, my name can't hello,") == ['hi', ',', 'my', 'name', 'ca', "n't", 'hello', ',']
    assert word_tokenize("It costs 1,000 dollars; really?") == ['It', 'costs', '1,000', 'dollars', ';', 'really', '?']


def test_tfidf_similarity_hand_computed():
    st = TfidfStats(np.array([1.0, 2.0, 3.0]), {"rome": 0, "city": 1, "paris": 2})
    assert tfidf_similarity("Rome rome city", "city of Paris", st) == pytest.approx(4 / (math.sqrt(8) * math.sqrt(13)))
    assert tfidf_similarity("a Paris", "PARIS!", st) == pytest.approx(1.0)
    assert math.isnan(tfidf_similarity("nothing known", "Rome", st))


def test_student_t_quantiles_against_tables():
    for df, t in [(1, 12.7062047), (2, 4.3026527), (5, 2.5705818), (10, 2.2281389), (30, 2.0422725), (1e8, 1.9599640)]:
        assert student_t_quantile(0.975, df) == pytest.approx(t, abs=1e-6)
    assert student_t_quantile(0.95, 4) == pytest.approx(2.1318468, abs=1e-6)
    m, h = mean_ci([0.0, 1.0, 1.0, 0.0])
    assert m == 0.5 and h == pytest.approx(3.1824463 * np.std([0, 1, 1, 0], ddof=1) / 2, abs=1e-6)
    assert math.isnan(mean_ci([3.0])[1])
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci([1.0, math.inf])


# ---------------------------------------------------------------- per-record metric wiring, with hand-set scores
def fake_scorer(probs):
    """A stand-in for score_targets: (prompt, target) -> a one-token score with probability probs[(prompt, target)]."""
    def score(model, tok, pairs, batch_size=32):
        return [ts([7], [7 if probs[p] > 0.5 else 0], [math.log(probs[p])], prompt=p[0], target=p[1]) for p in pairs]
    return score


def test_counterfact_metric_roles(monkeypatch):
    rec = EditRecord(5, "Angola", "{} is located in", "Antarctica", "Africa",
                     paraphrase_prompts=("P1", "P2"), neighborhood_prompts=("N1", "N2", "N3"),
                     neighborhood_answers=("Africa",) * 3)
    probs = {("Angola is located in", "Antarctica"): 0.6, ("Angola is located in", "Africa"): 0.2,
             ("P1", "Antarctica"): 0.3, ("P1", "Africa"): 0.4, ("P2", "Antarctica"): 0.7, ("P2", "Africa"): 0.1,
             ("N1", "Antarctica"): 0.1, ("N1", "Africa"): 0.8, ("N2", "Antarctica"): 0.5, ("N2", "Africa"): 0.3,
             ("N3", "Antarctica"): 0.2, ("N3", "Africa"): 0.6}
    monkeypatch.setattr(M, "score_targets", fake_scorer(probs))
    m = evaluate(None, None, [rec]).records[0]["metrics"]
    assert m["efficacy_score"] == 1.0 and m["efficacy_magnitude"] == pytest.approx(0.4)
    assert m["paraphrase_score"] == 0.5 and m["paraphrase_magnitude"] == pytest.approx((-0.1 + 0.6) / 2)
    assert m["neighborhood_score"] == pytest.approx(2 / 3)                      # true preferred on N1 and N3
    assert m["neighborhood_magnitude"] == pytest.approx((0.7 - 0.2 + 0.4) / 3)
    assert m["generation_entropy"] is None and m["reference_score"] is None


def test_summary_overall_score_and_ci(monkeypatch):
    recs = [EditRecord(i, f"S{i}", "{} is in", "new", "old", paraphrase_prompts=(f"P{i}",),
                       neighborhood_prompts=(f"N{i}",), neighborhood_answers=("old",)) for i in range(4)]
    es = [1, 1, 0, 1]; ps = [1, 0, 0, 1]; ns = [1, 1, 1, 0]
    probs = {}
    for i in range(4):
        probs[(f"S{i} is in", "new")], probs[(f"S{i} is in", "old")] = (0.6, 0.3) if es[i] else (0.3, 0.6)
        probs[(f"P{i}", "new")], probs[(f"P{i}", "old")] = (0.6, 0.3) if ps[i] else (0.3, 0.6)
        probs[(f"N{i}", "new")], probs[(f"N{i}", "old")] = (0.3, 0.6) if ns[i] else (0.6, 0.3)
    monkeypatch.setattr(M, "score_targets", fake_scorer(probs))
    run = evaluate(None, None, recs)
    s = run.summary()
    assert s["efficacy_score"]["mean"] == 0.75 and s["paraphrase_score"]["mean"] == 0.5 and s["neighborhood_score"]["mean"] == 0.75
    assert s["overall_score"]["mean"] == pytest.approx(3 / (1 / 0.75 + 1 / 0.5 + 1 / 0.75))
    assert s["efficacy_score"]["ci"] == pytest.approx(3.1824463 * np.std(es, ddof=1) / 2, abs=1e-6)
    assert s["efficacy_magnitude"]["mean"] == pytest.approx(np.mean([0.3 if e else -0.3 for e in es]))
    t = run.table(scale=100)
    assert t.loc["efficacy_score", "mean"] == 75.0 and t.loc["efficacy_score", "abbr"] == "ES"
    assert math.isnan(t.loc["overall_score", "ci"]) and t.loc["efficacy_score", "n"] == 4


def test_zsre_metrics_match_independent_argmax(lm):
    model, tok = lm
    zs = load_zsre(sample_path("zsre-1k")).sample(4, seed=1)
    run = evaluate(model, tok, zs, batch_size=5)
    for rec, r in zip(zs, run.records):
        for metric, pairs in (("zsre_efficacy", [(rec.rewrite_prompt, rec.target_new)]),
                              ("zsre_paraphrase", [(rec.paraphrase_prompts[0], rec.target_new)]),
                              ("zsre_specificity", [(rec.neighborhood_prompts[0], rec.neighborhood_answers[0])])):
            hits = []
            for p, t in pairs:
                try:
                    tgt, _, preds = one_at_a_time(model, tok, p, t)
                except AssertionError:      # prompt tokens not a prefix of the joined text: nothing independent to compare
                    continue
                hits += [a == b for a, b in zip(tgt, preds)]
                assert r["metrics"][metric] == pytest.approx(np.mean(hits))
        assert set(r["metrics"]) == {"zsre_efficacy", "zsre_paraphrase", "zsre_specificity"}
    assert run.summary()["zsre_efficacy"]["n"] == 4


def test_easyedit_locality_against_reference():
    tok = tiny_tokenizer("sentencepiece")
    m0, m1 = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ee = load_easyedit_counterfact(sample_path("easyedit-counterfact-val")).sample(4, seed=0)
    pre = evaluate(m0, tok, ee)
    assert all(r["metrics"].get("easyedit_locality") is None for r in pre.records)
    assert "pre-edit" in pre.records[0]["unavailable"]["easyedit_locality"]
    same = evaluate(m0, tok, ee, reference=pre)
    assert all(r["metrics"]["easyedit_locality"] == 1.0 for r in same.records)
    other = evaluate(m1, tok, ee, reference=pre)
    for rec, r in zip(ee, other.records):
        p, a = rec.neighborhood_prompts[0], rec.neighborhood_answers[0]
        _, _, pre_pred = one_at_a_time(m0, tok, p, a)
        _, _, post_pred = one_at_a_time(m1, tok, p, a)
        assert r["metrics"]["easyedit_locality"] == pytest.approx(np.mean(np.equal(pre_pred, post_pred)))
        tgt, _, preds = one_at_a_time(m1, tok, rec.rewrite_prompt, rec.target_new)
        assert r["metrics"]["easyedit_rewrite_acc"] == pytest.approx(np.mean(np.equal(tgt, preds)))
    ev = EditEvaluation(pre, other)
    assert set(ev.table().index) >= {"efficacy_score", "easyedit_rewrite_acc", "easyedit_locality"}
    assert math.isnan(ev.table().loc["easyedit_locality", "pre_mean"])


# ---------------------------------------------------------------- generation
def greedy_one_at_a_time(model, tok, prompt, max_out_len):
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        while len(ids) < max_out_len:
            ids = ids + [int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
    return ids


def test_generation_top1_is_greedy(lm):
    model, tok = lm
    prompts = ["The Colosseum is located in", "Toronto is", "LeBron James plays the sport of basketball and"]
    gens = sample_generations(model, tok, prompts, max_out_len=18, top_k=1, seed=0)
    for p, g in zip(prompts, gens):
        assert list(g.token_ids) == greedy_one_at_a_time(model, tok, p, 18) and g.finite
        assert g.n_prompt_tokens == len(tok(p)["input_ids"])
        assert g.text.startswith(p)


def test_generation_seeded(gpt2):
    model, tok = gpt2
    a = sample_generations(model, tok, ["Toronto is", "Paris is"], max_out_len=25, seed=4)
    assert a == sample_generations(model, tok, ["Toronto is", "Paris is"], max_out_len=25, seed=4)
    assert a != sample_generations(model, tok, ["Toronto is", "Paris is"], max_out_len=25, seed=5)
    assert all(len(g.token_ids) == 25 for g in a)
    vocab_seen = {t for g in a for t in g.token_ids[g.n_prompt_tokens:]}
    assert len(vocab_seen) > 1


def test_generation_metrics_in_evaluate(gpt2, cf8, tmp_path):
    model, tok = gpt2
    st = TfidfStats(np.ones(3), {"the": 0, "city": 1, "is": 2})

    class Snips:
        def texts(self, rel, tid): return ["The city is the city."] if rel else []

    run = evaluate(model, tok, cf8[:2], generation=True, max_out_len=20, seed=1, snippets=Snips(), tfidf=st)
    r = run.records[0]
    assert len(r["texts"]) == len(cf8[0].generation_prompts)
    assert r["metrics"]["generation_entropy"] == pytest.approx(generation_entropy(r["texts"]))
    expected_rs = tfidf_similarity(" ".join(r["texts"]), "The city is the city.", st)
    assert (math.isnan(expected_rs) and "reference_score" in r["nonfinite"]) or r["metrics"]["reference_score"] == pytest.approx(expected_rs)
    assert run.records == evaluate(model, tok, cf8[:2], generation=True, max_out_len=20, seed=1, snippets=Snips(), tfidf=st).records
    no_files = evaluate(model, tok, cf8[:1], generation=True, max_out_len=20)
    assert no_files.records[0]["metrics"]["reference_score"] is None
    assert "attribute snippets" in no_files.records[0]["unavailable"]["reference_score"]
    assert no_files.summary()["reference_score"]["note"].startswith("unavailable")


# ---------------------------------------------------------------- non-finite values: reported per record, never averaged
def test_nonfinite_reported_not_averaged(gpt2, cf8, tmp_path):
    _, tok = gpt2
    sick = tiny_model("gpt2")
    poisoned = cf8[2].rewrite_prompt

    def hook(mod, args, kwargs, out):
        ids = kwargs["input_ids"]
        bad = torch.tensor([tok.decode(row).startswith(poisoned) for row in ids])
        out.logits[bad] = float("nan")
        return out

    h = sick.register_forward_hook(hook, with_kwargs=True)
    try:
        run = evaluate(sick, tok, cf8, batch_size=16)
    finally:
        h.remove()
    clean = evaluate(sick, tok, cf8, batch_size=16)
    bad = run.records[2]
    assert math.isnan(bad["metrics"]["efficacy_score"]) and math.isnan(bad["metrics"]["efficacy_magnitude"])
    assert "non-finite logits" in bad["nonfinite"]["efficacy_score"] and poisoned in bad["nonfinite"]["efficacy_score"]
    assert bad["metrics"]["neighborhood_score"] == clean.records[2]["metrics"]["neighborhood_score"]
    s = run.summary()["efficacy_score"]
    assert s["n"] == 7 and s["n_nonfinite"] == 1 and s["nonfinite_case_ids"] == [cf8[2].case_id]
    others = [r["metrics"]["efficacy_score"] for i, r in enumerate(clean.records) if i != 2]
    assert s["mean"] == pytest.approx(np.mean(others))
    js = json.loads(run.to_json(tmp_path / "run.json"))
    assert js["records"][2]["metrics"]["efficacy_score"] is None and "efficacy_score" in js["records"][2]["nonfinite"]
    assert json.loads((tmp_path / "run.json").read_text()) == js
    ev = EditEvaluation(clean, run)
    t = ev.table()
    assert t.loc["efficacy_score", "post_n_nonfinite"] == 1 and t.loc["efficacy_score", "pre_n_nonfinite"] == 0
    fr = ev.records_frame()
    assert (~fr[(fr.stage == "post") & (fr.metric == "efficacy_score")].finite).sum() == 1
    json.loads(ev.to_json())                           # strict JSON: no NaN literals


def test_eval_results_json_roundtrip(gpt2, cf8, tmp_path):
    model, tok = gpt2
    pre = evaluate(model, tok, cf8[:3])
    post = evaluate(tiny_model("gpt2", seed=3), tok, cf8[:3])
    ev = EditEvaluation(pre, post)
    d = json.loads(ev.to_json(tmp_path / "ev.json"))
    assert [r["case_id"] for r in d["records"]] == [r.case_id for r in cf8[:3]]
    assert d["records"][1]["post"]["efficacy_score"] == post.records[1]["metrics"]["efficacy_score"]
    assert d["summary"]["pre"]["efficacy_score"]["n"] == 3
    with pytest.raises(ValueError, match="different records"):
        EditEvaluation(pre, evaluate(model, tok, cf8[:2]))
    with pytest.raises(ValueError, match="unknown metric suite"):
        evaluate(model, tok, cf8[:1], suites=["rome"])


def test_suites_per_record_source(gpt2):
    model, tok = gpt2
    zs = load_zsre(sample_path("zsre-1k"))[:2]
    run = evaluate(model, tok, zs, suites=["counterfact", "zsre"])
    r = run.records[0]
    assert r["metrics"]["efficacy_score"] is None and "no true object" in r["unavailable"]["efficacy_score"]
    assert r["metrics"]["zsre_efficacy"] is not None
    assert run.summary()["efficacy_score"]["note"].startswith("unavailable")


def test_per_prompt_nll_layout(gpt2, cf8):
    model, tok = gpt2
    run = evaluate(model, tok, cf8[:1])
    rec, r = cf8[0], run.records[0]
    assert len(r["nll"]["paraphrase"]) == 2 and len(r["nll"]["neighborhood"]) == 10
    tgt, lps, _ = one_at_a_time(model, tok, rec.paraphrase_prompts[1], rec.target_true)
    assert r["nll"]["paraphrase"][1]["target_true"] == pytest.approx(-np.mean(lps), abs=1e-5)
    es = [x["target_true"] > x["target_new"] for x in r["nll"]["rewrite"]]      # ROME's summarize.py, by hand
    assert r["metrics"]["efficacy_score"] == np.mean(es)
    nm = [math.exp(-x["target_true"]) - math.exp(-x["target_new"]) for x in r["nll"]["neighborhood"]]
    assert r["metrics"]["neighborhood_magnitude"] == pytest.approx(np.mean(nm))
