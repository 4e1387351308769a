"""End-to-end editing of tiny random models of every supported family through the public API `ue.edit`."""
import json

import pytest
import torch

import unifiededit as ue
from unifiededit.datafiles import sample_path
from unifiededit.keys import ContextTemplates, compute_keys
from unifiededit.models import ModelAdapter
from unifiededit.tiny import TINY_FAMILIES, _TINY_TEXT, tiny_model, tiny_tokenizer
from unifiededit.corpus import model_sampled_corpus
from unifiededit.stats import collect_key_stats

# Subject-final prompts: random attention all but erases information travelling from the subject to the last token,
# so on random models an edit is only observable where the prediction is made (see the editing chapter).
REQUESTS = [
    {"prompt": "The most famous landmark is {}", "subject": "The Eiffel Tower", "target_new": {"str": "Rome"}},
    {"prompt": "The best player is {}", "subject": "LeBron James", "target_new": {"str": "football"}},
    {"prompt": "The mother tongue of {}", "subject": "Danielle Darrieux", "target_new": {"str": "English"}},
]


def setup(family):
    model = tiny_model(family, initializer_range=0.1)
    tok = tiny_tokenizer(TINY_FAMILIES[family])
    return model, tok


def stats_for(model, tok, layers):
    "C0 from 4,000 tokens sampled from the model itself: enough keys to span d_in = 256 directions."
    corpus = model_sampled_corpus(model, tok, 4000, seed=0, length=128)
    return collect_key_stats(model, tok, layers, corpus, n_tokens=4000, max_length=128, progress=False)


def next_token(model, tok, text):
    with torch.no_grad():
        return int(model(**tok(text, return_tensors="pt")).logits[0, -1].argmax())


def first_token(tok, target):
    return tok(" " + target, add_special_tokens=False)["input_ids"][0]


def target_logprob(model, tok, request):
    with torch.no_grad():
        logits = model(**tok(request["prompt"].format(request["subject"]), return_tensors="pt")).logits[0, -1]
    return float(logits.log_softmax(-1)[first_token(tok, request["target_new"]["str"])])


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
@pytest.mark.parametrize("method", ["rome", "memit", "emmet"])
def test_edit_flips_next_token_and_reverts(family, method):
    model, tok = setup(family)
    reqs = REQUESTS[:1] if method == "rome" else REQUESTS
    hp = ue.HParams.for_model(model, method, v_num_grad_steps=40)
    before_w = weights(model)
    before_tokens = [next_token(model, tok, r["prompt"].format(r["subject"])) for r in reqs]
    wanted = [first_token(tok, r["target_new"]["str"]) for r in reqs]
    assert before_tokens != wanted                                  # the test can fail: not already the answer
    lp_before = [target_logprob(model, tok, r) for r in reqs]
    e = ue.edit(model, tok, reqs, hparams=hp, stats=stats_for(model, tok, hp.layers), progress=False)
    if family == "gemma3":
        # Gemma-3 normalizes each MLP output (post-FFN RMSNorm) before it joins the residual stream, so in a *random*
        # model one MLP is one of many equal-sized terms and cannot decide the prediction alone; the real Gemma-3
        # test (slow) checks the argmax. Here: the target must gain a lot of probability.
        gains = [target_logprob(model, tok, r) - b for r, b in zip(reqs, lp_before)]
        assert min(gains) > 1.0, gains
    else:
        assert [next_token(model, tok, r["prompt"].format(r["subject"])) for r in reqs] == wanted
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before_w[n])}
    assert changed == {f"{e.module_names[l]}.weight" for l in e.layers}
    e.revert()
    assert all(torch.equal(p, before_w[n]) for n, p in model.named_parameters())
    assert [next_token(model, tok, r["prompt"].format(r["subject"])) for r in reqs] == before_tokens


def test_exact_emmet_maps_keys_onto_targets():
    model, tok = setup("gpt2")
    hp = ue.HParams.for_model(model, "emmet", emmet_lambda=0.0)
    layer = hp.layers[0]
    adapter = ModelAdapter.from_model(model)
    tmpl = ContextTemplates.generate(model, tok, hp.context_template_length_params, seed=0)
    W0 = adapter.weight(layer).detach().double().clone()
    e = ue.edit(model, tok, REQUESTS, hparams=hp, stats=stats_for(model, tok, hp.layers), templates=tmpl, progress=False)
    K = compute_keys(model, tok, REQUESTS, layer, tmpl, adapter=adapter, mode=hp.key_mode).double()   # (d_in, E)
    torch.testing.assert_close((adapter.weight(layer).double() - W0) @ K, e.values.delta.double().T, rtol=1e-4, atol=1e-4)


def test_apply_after_revert_and_save_load_round_trip(tmp_path):
    model, tok = setup("gpt2")           # GPT-2's Conv1D stores W transposed: the delta must be written as Δᵀ
    hp = ue.HParams.for_model(model, "memit", v_num_grad_steps=10)
    e = ue.edit(model, tok, REQUESTS[:2], hparams=hp, stats=stats_for(model, tok, hp.layers), progress=False)
    edited = weights(model)
    e.revert(); e.apply()
    assert all(torch.equal(p, edited[n]) for n, p in model.named_parameters())
    path = e.save(tmp_path / "edit.safetensors")
    loaded = ue.Edit.load(path)
    assert loaded.layers == e.layers and loaded.method == "memit" and not loaded.applied
    assert json.dumps(loaded.requests) == json.dumps(e.requests)
    fresh, _ = setup("gpt2")
    loaded.apply(fresh)
    assert all(torch.equal(p, edited[n]) for n, p in fresh.named_parameters())
    loaded.revert()
    pristine, _ = setup("gpt2")
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), pristine.parameters()))
    with pytest.raises(RuntimeError, match="not applied"):
        loaded.revert()


def test_edit_is_deterministic():
    deltas = []
    for _ in range(2):
        model, tok = setup("llama")
        hp = ue.HParams.for_model(model, "emmet", v_num_grad_steps=10)
        deltas.append(ue.edit(model, tok, REQUESTS, hparams=hp, stats=stats_for(model, tok, hp.layers),
                              progress=False).deltas)
    assert deltas[0].keys() == deltas[1].keys()
    assert all(torch.equal(deltas[0][l], deltas[1][l]) for l in deltas[0])


def test_edit_through_accelerate_dispatch_matches_plain_model():
    from accelerate import dispatch_model
    results = []
    for dispatched in (False, True):
        model, tok = setup("llama")
        if dispatched:
            names = ["model.embed_tokens", *[f"model.layers.{i}" for i in range(4)], "model.norm", "model.rotary_emb",
                     "lm_head"]
            model = dispatch_model(model, device_map={n: "cpu" for n in names})
        hp = ue.HParams.for_model(model, "memit", v_num_grad_steps=10)
        e = ue.edit(model, tok, REQUESTS, hparams=hp, stats=stats_for(model, tok, hp.layers), progress=False)
        results.append(e.deltas)
    for l in results[0]:
        torch.testing.assert_close(results[0][l], results[1][l], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("offload", ["disk", "cpu"])
def test_edit_of_accelerate_offloaded_layers_matches_unsplit(offload, tmp_path):
    """A model whose edited blocks accelerate keeps off the device (parameters on `meta`, values in CPU memory or on
    disk) is fingerprinted, measured and edited like the same model in one piece; the edit lands where the forward
    pass reads the weights, and reverts bit for bit."""
    from accelerate import cpu_offload, dispatch_model
    from unifiededit.models import parameter_value
    from unifiededit.store import model_fingerprint
    out = {}
    for split in (False, True):
        model, tok = setup("llama")
        hp = ue.HParams.for_model(model, "memit", v_num_grad_steps=10)
        if split:
            blocks = [f"model.layers.{l}" for l in hp.layers]
            if offload == "disk":
                dm = {n: ("disk" if n in blocks else "cpu") for n in
                      ["model.embed_tokens", *[f"model.layers.{i}" for i in range(4)], "model.norm", "model.rotary_emb", "lm_head"]}
                model = dispatch_model(model, device_map=dm, main_device="cpu", offload_dir=str(tmp_path / "off"))
            else:
                for b in blocks: cpu_offload(model.get_submodule(b), execution_device="cpu")
            assert all(model.get_submodule(b).mlp.down_proj.weight.device.type == "meta" for b in blocks)
        names = [f"model.layers.{l}.mlp.down_proj.weight" for l in hp.layers]
        before = {n: parameter_value(model, n).clone() for n in names}
        ids = tok(["The Eiffel Tower is", "LeBron James plays"], return_tensors="pt", padding=True)
        with torch.no_grad(): logits0 = model(**ids).logits
        st = stats_for(model, tok, hp.layers)
        e = ue.edit(model, tok, REQUESTS, hparams=hp, stats=st, progress=False)
        with torch.no_grad(): logits1 = model(**ids).logits
        after = {n: parameter_value(model, n).clone() for n in names}
        e.revert()
        with torch.no_grad(): logits2 = model(**ids).logits
        assert all(torch.equal(parameter_value(model, n), before[n]) for n in names)      # revert: bit for bit
        assert torch.equal(logits2, logits0)
        out[split] = dict(fp=model_fingerprint(model), C0={l: st[l].mom2 for l in hp.layers}, deltas=e.deltas,
                          after=after, logits0=logits0, logits1=logits1)
    a, b = out[False], out[True]
    assert a["fp"] == b["fp"]                                                  # fingerprint reads offloaded values
    for l in a["C0"]: torch.testing.assert_close(b["C0"][l], a["C0"][l], rtol=1e-6, atol=1e-9)
    for l in a["deltas"]: torch.testing.assert_close(b["deltas"][l], a["deltas"][l], rtol=1e-4, atol=1e-6)
    for n in a["after"]: torch.testing.assert_close(b["after"][n], a["after"][n], rtol=1e-5, atol=1e-6)  # written
    torch.testing.assert_close(b["logits1"], a["logits1"], rtol=1e-4, atol=1e-5)   # the edit is what the model uses
    assert (a["logits1"] - a["logits0"]).abs().max() > 1e-2                        # and it changed the outputs


@pytest.mark.gpu
def test_edit_split_over_gpu_and_cpu_matches_unsplit():
    from accelerate import dispatch_model
    results = []
    for split in (False, True):
        model, tok = setup("llama")
        if split:
            dm = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": "cpu",
                  "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
            model = dispatch_model(model, device_map=dm)
        hp = ue.HParams.for_model(model, "memit", v_num_grad_steps=10)
        results.append(ue.edit(model, tok, REQUESTS, hparams=hp, stats=stats_for(model, tok, hp.layers),
                               progress=False).deltas)
    for l in results[0]:
        torch.testing.assert_close(results[0][l], results[1][l], rtol=1e-3, atol=1e-4)


def test_non_finite_update_is_refused_and_model_untouched():
    model, tok = setup("llama")
    hp = ue.HParams.for_model(model, "memit", v_num_grad_steps=2)
    st = stats_for(model, tok, hp.layers)
    bad = {l: st[l].mom2.clone() for l in hp.layers}
    bad[hp.layers[-1]] = bad[hp.layers[-1]] * float("inf")
    before = weights(model)
    with pytest.raises(ValueError, match="NaN or inf"):
        ue.edit(model, tok, REQUESTS, hparams=hp, stats=bad, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_stats_for_another_module_are_refused():
    model, tok = setup("llama")
    hp = ue.HParams.for_model(model, "emmet", v_num_grad_steps=2)
    other = tiny_model("gpt2")                                            # d_in 256 vs the Llama model's 128
    st = collect_key_stats(other, tiny_tokenizer("bpe"), hp.layers, [_TINY_TEXT], n_tokens=500, max_length=64,
                           progress=False)
    before = weights(model)
    with pytest.raises(ValueError, match="another model"):
        ue.edit(model, tok, REQUESTS, hparams=hp, stats=st, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_nan_update_in_a_later_layer_rolls_back_the_earlier_ones(monkeypatch):
    """Multi-layer MEMIT writes layer by layer; if the second layer's update is not finite, the first layer's write
    must be undone and the error must name the layer. (The solver is replaced to produce the NaN on demand; what is
    tested is the guard and the rollback in `edit`.)"""
    import unifiededit.editing as editing
    real, calls = editing.memit_update, []

    def flaky(C, K, R, return_info=False):
        calls.append(1)
        delta, info = real(C, K, R, return_info=True)
        if len(calls) == 2: delta = delta * float("nan")
        return (delta, info) if return_info else delta

    monkeypatch.setattr(editing, "memit_update", flaky)
    model, tok = setup("llama")
    hp = ue.HParams.for_model(model, "memit", v_num_grad_steps=2)
    assert len(hp.layers) == 2
    st = stats_for(model, tok, hp.layers)
    before = weights(model)
    with pytest.raises(FloatingPointError, match=f"layer {hp.layers[1]}"):
        ue.edit(model, tok, REQUESTS, hparams=hp, stats=st, progress=False)
    assert len(calls) == 2
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_real_model_edit_generalizes_and_keeps_unrelated_facts(name):
    """A real pretrained model: EMMET writes the Eiffel Tower into Rome; the edited prompt and a paraphrase say Rome,
    unrelated facts keep their answers, and revert restores the weights bit for bit."""
    from unifiededit.pretrained import greedy_generate, load_pretrained
    try:
        model, tok = load_pretrained(name)
    except ImportError as err:
        pytest.skip(str(err))
    req = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": {"str": "Rome"}}
    edited = ["The Eiffel Tower is located in the city of", "The Eiffel Tower can be found in the city of"]
    unrelated = ["The Statue of Liberty is located in the city of", "The Kremlin is located in the city of",
                 "The capital of Japan is"]
    before = greedy_generate(model, tok, edited + unrelated, 4)
    snapshot = weights(model)
    hp = ue.HParams.for_model(model, "emmet")
    st = collect_key_stats(model, tok, hp.layers, sample_path("wikitext-2-test"), n_tokens="min",
                           progress=False)
    e = ue.edit(model, tok, [req], hparams=hp, stats=st, progress=False)
    after = greedy_generate(model, tok, edited + unrelated, 4)
    assert all(a.strip().startswith("Rome") for a in after[:2]), after
    assert after[2:] == before[2:], (before, after)
    e.revert()
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())
