"""Causal tracing (unifiededit.tracing) on tiny random models: exactness at both ends, agreement with a direct
transcription of ROME's procedure, reproducible noise, and clear errors."""
import numpy as np
import pytest
import torch

from unifiededit.data import EditRecord
from unifiededit.hooks import Trace
from unifiededit.hparams import HParams
from unifiededit.models import ModelAdapter
from unifiededit.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer
from unifiededit.trace_analysis import (average_effect, known_facts, layers_from_trace, load_traces, save_traces,
                                        trace_facts)
from unifiededit.tracing import (KINDS, LayerRunner, TraceResult, locate_subject, make_noise, noise_scale, trace_fact,
                                 trace_with_patch, window_layers)

PROMPT, SUBJECT = "{} is located in the city of", "The Eiffel Tower"
_MODULE_KIND = {"block": "layer", "mlp": "mlp", "attn": "attn"}


pytestmark = pytest.mark.usefixtures("one_thread")


def setup(family, seed=0):
    m, tok = tiny_model(family, seed=seed), tiny_tokenizer(TINY_FAMILIES[family])
    text, ids, sr = locate_subject(tok, PROMPT, SUBJECT)
    return m, tok, ids, sr


def rome_reference(model, ids, subject_range, answer_id, restoration, noise):
    """ROME's trace_with_patch written out independently: one full forward pass, row 0 clean, rows 1.. corrupted by
    noise added to the embedding module's output, each restored state copied from row 0."""
    a, (b, e) = ModelAdapter.from_model(model), subject_range
    spec = {}
    for t, k, l in restoration: spec.setdefault(a.name(_MODULE_KIND[k], l), []).append(t)
    def patch(name, out):
        out = out.clone()
        if name == a.name("embed"): out[1:, b:e] += noise.to(out.dtype)
        for t in spec.get(name, []): out[1:, t] = out[0, t]
        return out
    with torch.no_grad(), Trace(model, [a.name("embed")] + list(spec), retain_output=False, edit_output=patch):
        logits = model(input_ids=torch.tensor([ids] * (noise.shape[0] + 1)), use_cache=False).logits[1:, -1]
    return logits.double().softmax(-1)[:, answer_id].mean().item()


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_restoring_everything_gives_the_clean_probability(family):
    m, tok, ids, sr = setup(family)
    with torch.no_grad(): clean = m(torch.tensor([ids])).logits[0, -1].double().softmax(-1)
    r = LayerRunner(m, ids)
    ans = int(clean.argmax())
    noise = make_noise(3, sr[1] - sr[0], r.embeddings.shape[-1], 2.0, seed=0)
    everything = [(t, "block", l) for t in range(len(ids)) for l in range(r.n_layers)]
    last_block = [(len(ids) - 1, "block", r.n_layers - 1)]
    got, low = trace_with_patch(r, sr, ans, [everything, last_block], noise, batch_rows=4)
    assert abs(got[0].item() - clean[ans].item()) < 1e-9
    assert abs(got[1].item() - clean[ans].item()) < 1e-9
    assert abs(low - clean[ans].item()) > 1e-7          # the corruption did change the answer's probability


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_no_restoration_gives_the_corrupted_probability(family):
    m, tok, ids, sr = setup(family)
    r = LayerRunner(m, ids)
    noise = make_noise(4, sr[1] - sr[0], r.embeddings.shape[-1], 2.0, seed=1)
    got, low = trace_with_patch(r, sr, 7, [[]], noise)
    corrupted = rome_reference(m, ids, sr, 7, [], noise)     # independent: a full forward with noisy embeddings
    assert got[0].item() == low
    assert abs(low - corrupted) < 1e-9
    # tokens before the subject see no noise (causal attention): restoring them is a no-op
    if sr[0] > 0:
        before, _ = trace_with_patch(r, sr, 7, [[(0, "block", l)] for l in range(r.n_layers)], noise)
        np.testing.assert_allclose(before.numpy(), low, atol=1e-12)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_batched_restorations_match_rome(family):
    m, tok, ids, sr = setup(family, seed=2)
    r = LayerRunner(m, ids)
    T, L = len(ids), r.n_layers
    ans = int(r.clean_probs.argmax())
    noise = make_noise(3, sr[1] - sr[0], r.embeddings.shape[-1], 1.5, seed=0)
    restorations = [[(sr[1] - 1, "block", 1)], [(sr[1] - 1, "mlp", l) for l in window_layers(1, L, 3)],
                    [(T - 1, "attn", l) for l in window_layers(2, L, 3)], [(sr[0], "attn", 0), (T - 2, "mlp", 3)],
                    [(sr[1], "block", 2)]]
    got, _ = trace_with_patch(r, sr, ans, restorations, noise, batch_rows=6)   # 2 restorations per chunk
    want = [rome_reference(m, ids, sr, ans, x, noise) for x in restorations]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9)


def test_noise_is_reproducible_from_its_seed():
    a, b = make_noise(3, 2, 16, 0.5, seed=11), make_noise(3, 2, 16, 0.5, seed=11)
    assert torch.equal(a, b) and a.dtype == torch.float64
    assert not torch.equal(a, make_noise(3, 2, 16, 0.5, seed=12))
    state = torch.random.get_rng_state()
    make_noise(3, 2, 16, 0.5, seed=11)
    assert torch.equal(state, torch.random.get_rng_state())   # the global generator is untouched
    m, tok = tiny_model("llama"), tiny_tokenizer("sentencepiece")
    kw = dict(noise=1.0, samples=2, window=3, kinds=("mlp",))
    x = trace_fact(m, tok, PROMPT, SUBJECT, seed=4, **kw)
    y = trace_fact(m, tok, PROMPT, SUBJECT, seed=4, **kw)
    z = trace_fact(m, tok, PROMPT, SUBJECT, seed=5, **kw)
    assert np.array_equal(x.scores["mlp"], y.scores["mlp"]) and x.low_score == y.low_score
    assert not np.array_equal(x.scores["mlp"], z.scores["mlp"])


def test_noise_scale_is_three_embedding_stds():
    m, tok = tiny_model("gpt2"), tiny_tokenizer("bpe")
    subjects = ["Paris", "LeBron James"]
    rows = torch.cat([m.transformer.wte.weight[tok(s)["input_ids"]] for s in subjects]).double()
    assert abs(noise_scale(m, tok, subjects) - 3 * rows.std().item()) < 1e-9


def test_trace_fact_cells_are_window_restorations():
    m, tok = tiny_model("gpt_neox", seed=1), tiny_tokenizer("bpe")
    res = trace_fact(m, tok, PROMPT, SUBJECT, noise=1.0, samples=2, window=3, seed=0)
    T, L = len(res.input_ids), 4
    assert set(res.scores) == set(KINDS) and all(v.shape == (T, L) for v in res.scores.values())
    b, e = res.subject_range
    r = LayerRunner(m, res.input_ids)
    noise = make_noise(2, e - b, r.embeddings.shape[-1], 1.0, seed=0)
    for kind, t, l in [("mlp", e - 1, 2), ("attn", T - 1, 0), ("block", e, 3)]:
        layers = [l] if kind == "block" else window_layers(l, L, 3)
        want = rome_reference(m, res.input_ids, (b, e), res.answer_id, [(t, kind, j) for j in layers], noise)
        assert abs(res.scores[kind][t, l] - want) < 1e-9
    np.testing.assert_array_equal(res.indirect_effect("block")[:b], 0.0)


def test_bad_input_gives_clear_errors():
    m, tok = tiny_model("llama"), tiny_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="does not occur in the prompt"):
        trace_fact(m, tok, "The Colosseum is located in", "Eiffel Tower", noise=1.0)
    with pytest.raises(ValueError, match="unknown trace kind 'resid'"):
        trace_fact(m, tok, PROMPT, SUBJECT, noise=1.0, kinds=("mlp", "resid"))
    r = LayerRunner(m, locate_subject(tok, PROMPT, SUBJECT)[1])
    sr = locate_subject(tok, PROMPT, SUBJECT)[2]
    noise = make_noise(2, sr[1] - sr[0], 64, 1.0)
    with pytest.raises(ValueError, match="unknown trace kind 'ffn'"):
        trace_with_patch(r, sr, 0, [[(sr[0], "ffn", 1)]], noise)
    with pytest.raises(ValueError, match="outside"):
        trace_with_patch(r, sr, 0, [[(sr[0], "mlp", 4)]], noise)
    with pytest.raises(ValueError, match="does not fit"):
        trace_with_patch(r, sr, 0, [[(sr[0], "mlp", 1)]], noise[:, :1])
    with pytest.raises(ValueError, match="unknown trace kind"):
        layers_from_trace(np.zeros(4), kind="residual")
    with pytest.raises(ValueError, match="window"):
        trace_fact(m, tok, PROMPT, SUBJECT, noise=1.0, window=0)
    with pytest.raises(ValueError, match="noise scale"):
        make_noise(2, 2, 2, -1.0)
    with pytest.raises(TypeError, match="cannot read a fact"):
        trace_facts(m, tok, [42], noise=1.0)


def test_layers_from_trace():
    curve = np.array([0.0, 0.1, 0.2, 0.6, 0.3, 0.1, 0.0, 0.0])
    assert layers_from_trace(curve) == [3]
    assert layers_from_trace(curve, n=5) == [1, 2, 3, 4, 5]
    assert layers_from_trace(curve[::-1].copy(), n=5) == [2, 3, 4, 5, 6]
    assert layers_from_trace(np.r_[1.0, np.zeros(7)], n=3) == [0, 1, 2]   # clipped to the model
    with pytest.raises(ValueError, match="1..8"):
        layers_from_trace(curve, n=9)

    def fake(mlp_last_subject):     # one-fact traces whose last subject token (index 1) has the given MLP probs
        scores = np.zeros((3, len(mlp_last_subject))); scores[1] = mlp_last_subject
        return TraceResult("x", "s", [0, 1, 2], ["a", "b", "c"], (0, 2), 0, "o", 1.0, 0.0, {"mlp": scores}, 10, 1, 1.0, 0)
    facts = [fake([0.1, 0.6, 0.2, 0.0]), fake([0.1, 0.1, 0.4, 0.0])]      # mean: [.1, .35, .3, 0] -> layer 1
    assert layers_from_trace(facts) == [1] and layers_from_trace(facts[1]) == [2]
    np.testing.assert_allclose(average_effect(facts, "mlp").layer_curve()[0], [0.1, 0.35, 0.3, 0.0])
    m = tiny_model("llama")
    hp = HParams.for_model(m, "memit", layers=layers_from_trace(facts, n=2))
    assert hp.layers == [1, 2]
    with pytest.raises(ValueError, match="not traced"):
        layers_from_trace(facts, kind="attn")


def test_save_and_load_traces(tmp_path):
    m, tok = tiny_model("gpt2"), tiny_tokenizer("bpe")
    facts = [(PROMPT, SUBJECT), ("{} plays the sport of", "LeBron James", "basketball")]
    traces = trace_facts(m, tok, facts, samples=1, window=3, progress=False)
    assert [t.seed for t in traces] == [0, 1] and traces[0].noise == traces[1].noise
    save_traces(traces, tmp_path / "t.npz", note="tiny")
    back, info = load_traces(tmp_path / "t.npz")
    assert info == {"note": "tiny"}
    for x, y in zip(traces, back):
        assert (x.prompt, x.subject_range, x.tokens, x.answer_id, x.low_score) == \
               (y.prompt, y.subject_range, y.tokens, y.answer_id, y.low_score)
        for k in KINDS: np.testing.assert_array_equal(x.scores[k], y.scores[k])


def test_known_facts_keeps_the_top1_answers():
    m, tok = tiny_model("gpt2", seed=0), tiny_tokenizer("bpe")
    kept, dropped = None, None
    for prompt in ["The capital of France is", "Steve Jobs was the founder of", "The Space Needle is in the city of",
                   "LeBron James plays the sport of", "Toronto is a city in"]:
        with torch.no_grad(): top = int(m(torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].argmax())
        word = tok.decode([top])
        if word.startswith(" ") and word.strip() and tok(word)["input_ids"] == [top]:
            kept = EditRecord(0, prompt.split()[0], "{}" + prompt[len(prompt.split()[0]):], "x", word.strip())
            other = next(i for i in range(300, 500) if i != top and tok.decode([i]).startswith(" "))
            dropped = EditRecord(1, kept.subject, kept.prompt, "x", tok.decode([other]).strip())
            break
    assert kept is not None, "no prompt with a round-tripping top-1 word for this tiny model"
    assert known_facts(m, tok, [kept, dropped]) == [kept]
