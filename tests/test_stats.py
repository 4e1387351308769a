"""Tests for unifiededit.stats: Σ k kᵀ against an independent computation, padding, truncation, budget, cache, corpora."""
import math
import os
import warnings
from pathlib import Path

import pytest
import torch

from unifiededit.datafiles import sample_path
from unifiededit.models import ModelAdapter
from unifiededit.tiny import tiny_model, tiny_tokenizer, TINY_FAMILIES
from unifiededit.corpus import (Corpus, as_corpus, default_corpus, file_corpus, model_sampled_corpus, special_prefix,
                                text_corpus, token_batches)
from unifiededit.stats import KeyStats, KeyStatsCollector, LayerStats, StatsCache, collect_key_stats, resolve_n_tokens

SENTENCES = ["The Eiffel Tower is located in the city of Paris.", "Toronto is a city in Canada.",
             "Berlin is the capital of Germany, and Madrid of Spain.", "Michael Jordan is a professional basketball player.",
             "In 1998, the company released a new product; it was a success.", "Apple A5 was created by Apple."]
DOCS = [" ".join(SENTENCES[i:] + SENTENCES[:i]) for i in range(len(SENTENCES))] * 4   # 24 documents, ~60 tokens each


def setup(family="llama"):
    model = tiny_model(family)
    tok = tiny_tokenizer(TINY_FAMILIES[family])
    return model, tok, ModelAdapter.from_model(model)


def padded(seqs, pad_id):
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s); mask[b, :len(s)] = 1
    return ids, mask


def reference_sum(model, adapter, layer, seqs):
    "Σ k kᵀ from a plain forward hook on the rewrite module, one unpadded sequence at a time, in float64."
    keys = []
    h = adapter.module("rewrite", layer).register_forward_hook(lambda m, inp, out: keys.append(inp[0][0].double()))
    try:
        with torch.no_grad():
            for s in seqs: model(torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long))
    finally:
        h.remove()
    K = torch.cat(keys)                                            # (n, d_in)
    return K.T @ K, K.shape[0]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma3"])
def test_sum_matches_independent_computation_several_layers_one_pass(family):
    model, tok, ad = setup(family)
    seqs = [tok(t)["input_ids"] for t in SENTENCES]
    ids, mask = padded(seqs, tok.pad_token_id)
    assert (mask == 0).any()
    col = KeyStatsCollector(model, [0, 2, 3], matmul_dtype=torch.float64)
    calls = []
    orig = model.forward
    model.forward = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    try:
        assert col.update(ids, mask) == sum(map(len, seqs))
    finally:
        model.forward = orig
    assert len(calls) == 1                                         # all layers from a single forward pass
    for layer in [0, 2, 3]:
        ref, n = reference_sum(model, ad, layer, seqs)
        assert col.counts[layer] == n
        torch.testing.assert_close(col.sums[layer], ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_float32_products_are_accurate():
    model, tok, ad = setup("llama")
    seqs = [tok(t)["input_ids"] for t in DOCS[:8]]
    col32, col64 = KeyStatsCollector(model, 3), KeyStatsCollector(model, 3, matmul_dtype=torch.float64)
    for ids, mask in [padded(seqs[:4], tok.pad_token_id), padded(seqs[4:], tok.pad_token_id)]:
        col32.update(ids, mask); col64.update(ids, mask)
    rel = float((col32.sums[3] - col64.sums[3]).norm() / col64.sums[3].norm())
    assert 0 < rel < 1e-6
    assert col32.sums[3].dtype == torch.float64


def test_padding_excluded_whatever_the_pad_token():
    model, tok, ad = setup("gpt2")
    seqs = [tok(t)["input_ids"] for t in SENTENCES]
    ids, mask = padded(seqs, tok.pad_token_id)
    a = KeyStatsCollector(model, [1, 3]); a.update(ids, mask)
    b = KeyStatsCollector(model, [1, 3]); b.update(ids.masked_fill(mask == 0, 7), mask)   # other garbage in the pads
    unpadded = KeyStatsCollector(model, [1, 3])
    for s in seqs: unpadded.update(torch.tensor([s]))
    for layer in (1, 3):
        assert a.counts[layer] == unpadded.counts[layer] == int(mask.sum())
        torch.testing.assert_close(a.sums[layer], b.sums[layer], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a.sums[layer], unpadded.sums[layer], rtol=1e-5, atol=1e-5)
    # counting the padded positions would change the sum: the test can tell
    c = KeyStatsCollector(model, 1); c.update(ids, torch.ones_like(mask))
    assert not torch.allclose(c.sums[1], a.sums[1], rtol=1e-4)


def test_pass_stops_at_the_deepest_rewrite_input():
    model, tok, ad = setup("llama")
    fired = []
    hooks = [ad.module("layer", i).register_forward_hook(lambda m, a, o, i=i: fired.append(f"layer{i}"))
             for i in range(ad.n_layers)]
    hooks += [ad.module("rewrite", i).register_forward_hook(lambda m, a, o, i=i: fired.append(f"rewrite{i}"))
              for i in range(ad.n_layers)]
    hooks.append(ad.module("ln_f").register_forward_hook(lambda m, a, o: fired.append("ln_f")))
    hooks.append(ad.module("lm_head").register_forward_hook(lambda m, a, o: fired.append("lm_head")))
    try:
        KeyStatsCollector(model, [0, 1]).update(torch.tensor([tok(SENTENCES[0])["input_ids"]]))
    finally:
        for h in hooks: h.remove()
    assert fired == ["rewrite0", "layer0"]                     # rewrite1 itself never runs: only its input is needed


def test_packing_reconstructs_the_stream_and_budget_is_exact():
    tok = tiny_tokenizer("sentencepiece")
    stream = []
    for d in DOCS: stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows = [r[m.bool()].tolist() for ids, mask in token_batches(DOCS, tok, max_length=32, batch_size=5)
            for r, m in zip(ids, mask)]
    assert all(r[0] == tok.bos_token_id for r in rows) and all(len(r) == 32 for r in rows[:-1])
    assert sum((r[1:] for r in rows), []) == stream
    for budget in (1, 31, 32, 33, 500):
        for pack in (True, False):
            n = sum(int(m.sum()) for _, m in token_batches(DOCS, tok, max_length=32, batch_size=3, n_tokens=budget, pack=pack))
            assert n == budget
    with pytest.raises(ValueError, match="n_tokens"): next(token_batches(DOCS, tok, n_tokens=-3))
    with pytest.raises(ValueError, match="no room"): next(token_batches(DOCS, tok, max_length=1))


def test_document_mode_truncates_each_document():
    tok = tiny_tokenizer("bpe")
    batches = list(token_batches(DOCS[:5] + ["   \n"], tok, max_length=16, batch_size=2, pack=False))
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]                     # the blank document is skipped
    lengths = torch.cat([m.sum(1) for _, m in batches]).tolist()
    assert lengths == [min(16, len(tok(d)["input_ids"])) for d in DOCS[:5]]


def test_collect_budget_min_and_counts(tmp_path):
    model, tok, ad = setup("llama")
    ks = collect_key_stats(model, tok, [3, 1], DOCS, n_tokens="min", min_factor=2, max_length=64, progress=False)
    assert list(ks) == [1, 3] and isinstance(ks, KeyStats)
    assert [ks[i].n for i in ks] == [2 * ad.d_in(1)] * 2
    assert all(math.isfinite(ks[i].meta["cond"]) for i in ks)        # 'min' reports the conditioning
    ks = collect_key_stats(model, tok, 2, DOCS, n_tokens=100, max_length=64, progress=False)
    assert ks[2].n == 100
    assert resolve_n_tokens("min", 128) == 1280 and resolve_n_tokens(None, 128) is None
    with pytest.raises(ValueError, match="n_tokens"): resolve_n_tokens("max", 128)
    with pytest.raises(ValueError, match="n_tokens"): resolve_n_tokens(0, 128)
    with pytest.raises(ValueError, match="out of range"): collect_key_stats(model, tok, 9, DOCS, progress=False)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        collect_key_stats(model, tok, 1, DOCS, max_length=10_000, progress=False)


def test_collect_matches_independent_computation_end_to_end():
    model, tok, ad = setup("gpt2")
    ks = collect_key_stats(model, tok, [0, 3], DOCS, n_tokens=None, max_length=48, batch_size=3, progress=False)
    seqs = [(ids[m.bool()]).tolist() for ib, mb in token_batches(DOCS, tok, 48, 3) for ids, m in zip(ib, mb)]
    for layer in (0, 3):
        ref, n = reference_sum(model, ad, layer, seqs)
        assert ks[layer].n == n
        torch.testing.assert_close(ks[layer].mom2, ref / n, rtol=1e-5, atol=1e-6 * float((ref / n).abs().max()))
        torch.testing.assert_close(ks.C(layer, 3.0), 3.0 * ref / n, rtol=1e-5, atol=1e-5 * float((ref / n).abs().max()))


def test_determinism():
    model, tok, _ = setup("llama")
    a = collect_key_stats(model, tok, [0, 2], DOCS, n_tokens=400, max_length=64, progress=False)
    b = collect_key_stats(model, tok, [0, 2], DOCS, n_tokens=400, max_length=64, progress=False)
    assert all(torch.equal(a[i].mom2, b[i].mom2) for i in (0, 2))


def test_cache_hit_miss_and_corruption(tmp_path):
    model, tok, _ = setup("llama")
    kw = dict(n_tokens=300, max_length=64, progress=False, cache=tmp_path)
    first = collect_key_stats(model, tok, [1, 2], DOCS, **kw)
    assert first.meta["computed"] == [1, 2] and len(list(tmp_path.glob("*.safetensors"))) == 2
    hit = collect_key_stats(model, tok, [1, 2], DOCS, **kw)
    assert hit.meta["cached"] == [1, 2]
    assert all(torch.equal(hit[i].mom2, first[i].mom2) and hit[i].n == first[i].n for i in (1, 2))
    # any change of the key recomputes: budget, corpus, another layer set, modified weights
    assert collect_key_stats(model, tok, 1, DOCS, **dict(kw, n_tokens=200)).meta["computed"] == [1]
    assert collect_key_stats(model, tok, 1, DOCS[::-1], **kw).meta["computed"] == [1]
    meta = collect_key_stats(model, tok, [1, 3], DOCS, **kw).meta                # only the new layer is computed
    assert (meta["cached"], meta["computed"]) == ([1], [3])
    with torch.no_grad():
        ModelAdapter.from_model(model).weight(0)[0, 0] += 1.0          # an edit below layer 1 changes its keys
    edited = collect_key_stats(model, tok, 1, DOCS, **kw)
    assert edited.meta["computed"] == [1] and not torch.equal(edited[1].mom2, first[1].mom2)
    with torch.no_grad():
        ModelAdapter.from_model(model).weight(0)[0, 0] -= 1.0


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "wrong_key"])
def test_damaged_cache_file_is_reported_and_recomputed(tmp_path, damage):
    model, tok, _ = setup("gpt2")
    kw = dict(n_tokens=200, max_length=64, progress=False, cache=tmp_path)
    good = collect_key_stats(model, tok, 2, DOCS, **kw)
    (path,) = tmp_path.glob("*.safetensors")
    raw = bytearray(path.read_bytes())
    if damage == "flip": raw[-9] ^= 0x40                            # a bit in the tensor data
    elif damage == "truncate": raw = raw[: len(raw) - 100]
    elif damage == "garbage": raw = bytearray(b"not a safetensors file at all")
    else:                                                          # a valid file computed for another key
        other = collect_key_stats(model, tok, 2, DOCS, **dict(kw, n_tokens=150))
        raw = bytearray(next(p for p in tmp_path.glob("*.safetensors") if p != path).read_bytes())
        assert other[2].n == 150
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=str(path.name)) as rec:
        again = collect_key_stats(model, tok, 2, DOCS, **kw)
    reason = {"flip": "checksum", "truncate": "not a readable safetensors", "garbage": "not a readable safetensors",
              "wrong_key": "holds another key"}
    assert any(reason[damage] in str(r.message) for r in rec)
    assert again.meta["computed"] == [2]
    assert torch.equal(again[2].mom2, good[2].mom2)                 # recomputed, not the damaged numbers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert collect_key_stats(model, tok, 2, DOCS, **kw).meta["cached"] == [2]   # the file was rewritten


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    cache = StatsCache(tmp_path)
    s = LayerStats(torch.eye(3, dtype=torch.float64), 5, 0, "m")
    key = dict(layer=0, module="m", corpus="c")
    cache.save(key, s)
    before = cache.path(key).read_bytes()
    import unifiededit.store as store
    def boom(*a, **k): raise OSError("disk full")
    monkeypatch.setattr(store.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        cache.save(key, LayerStats(2 * torch.eye(3, dtype=torch.float64), 5, 0, "m"))
    assert cache.path(key).read_bytes() == before                # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.path(key).name]   # no temporary left


def test_low_precision_model_keys_are_upcast():
    model, tok, ad = setup("llama")
    model = model.to(torch.bfloat16)
    seqs = [tok(t)["input_ids"] for t in SENTENCES[:3]]
    col = KeyStatsCollector(model, 2); col.update(*padded(seqs, tok.pad_token_id))
    assert col.sums[2].dtype == torch.float64
    ref, _ = reference_sum(model, ad, 2, seqs)
    torch.testing.assert_close(col.sums[2], ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


def test_corpora(tmp_path):
    c = text_corpus(["a b", "c"])
    assert list(c) == list(c) == ["a b", "c"] and c.eos_between
    assert text_corpus(iter(["a b", "c"])).id == c.id != text_corpus(["a", "b c"]).id
    f = tmp_path / "x.txt"; f.write_text("one\ntwo\n")
    fc = as_corpus(f)
    assert list(fc) == ["one\n", "two\n"] and not fc.eos_between
    assert as_corpus(str(f)).id == fc.id == file_corpus([f]).id
    f.write_text("one\ntwo!\n"); assert file_corpus(f).id != fc.id
    assert as_corpus(c) is c
    with pytest.raises(FileNotFoundError, match="does not exist"): as_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(TypeError, match="cannot make a corpus"): as_corpus(42)
    with pytest.raises(TypeError, match="item 1"): text_corpus(["ok", None])
    bad = Corpus(lambda: iter(["ok", 3]), "id", "bad")
    with pytest.raises(TypeError, match="document 1"): list(bad)
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="datasets"): as_corpus("some-org/some-dataset")


def test_model_sampled_corpus_is_seeded_and_leaves_rng_alone():
    model, tok, _ = setup("gpt2")
    state = torch.random.get_rng_state()
    make = lambda seed: model_sampled_corpus(model, tok, n_tokens=60, seed=seed, batch_size=3, length=24)
    a = make(0)
    texts = list(a)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert texts == list(make(0)) and texts != list(make(1))
    assert a.id == make(0).id != make(1).id
    assert sum(len(tok(t)["input_ids"]) for t in texts) >= 60                # at least n_tokens, re-tokenized
    assert list(a) is not None and list(a) == texts                # generated once, re-iterable


def test_default_corpus_order(tmp_path, capsys):
    model, tok, _ = setup("gpt2")
    f = tmp_path / "local.txt"; f.write_text("\n".join(DOCS))
    c = default_corpus(model, tok, path=f, n_tokens=100)
    assert c.id == file_corpus(f).id and "local.txt" in capsys.readouterr().out
    c = default_corpus(model, tok, path=tmp_path / "nope.txt", n_tokens=100, timeout=1.0)
    out = capsys.readouterr().out
    assert "text sampled from the model" in out and "nope.txt" in out
    ks = collect_key_stats(model, tok, 1, None, n_tokens=100, progress=False)      # no corpus given: model-sampled
    assert ks[1].n == 100 and "sampled" in ks.meta["corpus"]


def test_wikitext_file():
    model, tok, ad = setup("llama")
    ks = collect_key_stats(model, tok, 2, sample_path("wikitext-2-test"), n_tokens=2000, max_length=128,
                           progress=False)
    assert ks[2].n == 2000 and "wiki.test.raw" in ks.meta["corpus"]
    C0 = ks.mom2(2)
    torch.testing.assert_close(C0, C0.T)
    assert float(torch.linalg.eigvalsh(C0)[0]) > 0 and math.isfinite(ks.cond(2))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    model, tok, _ = setup("llama")
    cpu = collect_key_stats(model, tok, [1, 3], DOCS, n_tokens=500, max_length=64, progress=False)
    gpu = collect_key_stats(model.cuda(), tok, [1, 3], DOCS, n_tokens=500, max_length=64, progress=False)
    for i in (1, 3):
        assert gpu[i].mom2.device.type == "cuda"
        torch.testing.assert_close(gpu[i].mom2.cpu(), cpu[i].mom2, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_smollm2_wikitext_min(tmp_path):
    from unifiededit.pretrained import load_pretrained
    model, tok = load_pretrained("smollm2-135m-instruct")
    ks = collect_key_stats(model, tok, 5, sample_path("wikitext-2-test"), n_tokens="min",
                           cache=tmp_path, progress=False)
    assert ks[5].n == 10 * 1536
    assert 1 < ks[5].meta["cond"] < 1e6
    assert collect_key_stats(model, tok, 5, sample_path("wikitext-2-test"), n_tokens="min",
                             cache=tmp_path, progress=False).meta["cached"] == [5]


def test_reduced_precision_forward_keeps_a_float64_sum():
    "precision='bfloat16' autocasts the forward pass; keys are upcast, summed in float64; the cache keeps them apart."
    model, tok, _ = setup("llama")
    kw = dict(n_tokens=300, max_length=64, progress=False)
    f32 = collect_key_stats(model, tok, 1, DOCS, **kw)
    bf16 = collect_key_stats(model, tok, 1, DOCS, precision="bfloat16", **kw)
    assert bf16[1].mom2.dtype == torch.float64 and bf16[1].n == f32[1].n
    rel = ((bf16[1].mom2 - f32[1].mom2).norm() / f32[1].mom2.norm()).item()
    assert 0 < rel < 0.05, rel
    with pytest.raises(ValueError, match="unknown precision"):
        collect_key_stats(model, tok, 1, DOCS, precision="fp8", **kw)
