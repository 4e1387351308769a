"""Tests for unifiededit.store: digests, atomic writes, stale temporary files, checksummed tensor files, the keyed
cache, and the identity of models (fingerprints, including accelerate-offloaded parameters)."""
import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

from unifiededit.tiny import tiny_model, tiny_tokenizer
from unifiededit.store import (CorruptFile, TensorCache, atomic_write, clean_stale_temps, digest, load_tensors,
                               model_fingerprint, model_id, read_json, save_tensors, temp_path, tensors_digest,
                               tokenizer_fingerprint, write_json_atomic, write_text_atomic)


def _tiny_llama(seed=0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(dtype).eval().requires_grad_(False)


# ---------------------------------------------------------------- digests
def test_digest_is_unambiguous_and_canonical():
    assert digest("ab", "c") != digest("a", "bc")
    assert digest(1) != digest("1") != digest(b"1")
    assert digest({"a": 1, "b": [2, 3]}) == digest({"b": [2, 3], "a": 1})
    assert len(digest()) == 64


def test_tensors_digest_sees_names_dtypes_shapes_and_bits():
    a = {"x": torch.arange(6.0).reshape(2, 3)}
    assert tensors_digest(a) == tensors_digest({"x": torch.arange(6.0).reshape(2, 3)})
    assert tensors_digest(a) != tensors_digest({"y": a["x"]})
    assert tensors_digest(a) != tensors_digest({"x": a["x"].double()})
    assert tensors_digest(a) != tensors_digest({"x": a["x"].reshape(3, 2)})
    b = a["x"].clone(); b.view(torch.int32)[1, 2] ^= 1
    assert tensors_digest(a) != tensors_digest({"x": b})
    assert len(tensors_digest({"s": torch.tensor(1.0, dtype=torch.bfloat16)})) == 64      # 0-d and bfloat16


# ---------------------------------------------------------------- atomic writes and temporary files
def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    p = write_text_atomic(tmp_path / "r.txt", "old")
    def fail(tmp):
        tmp.write_text("partial"); raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(p, fail)
    assert p.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["r.txt"]


def test_a_killed_writer_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    "A real process killed (SIGKILL) in the middle of a write: its temporary file stays, and is recognised as stale."
    code = ("import sys, time; sys.path.insert(0, %r); from unifiededit.store import atomic_write\n"
            "def slow(tmp):\n    tmp.write_text('half'); print('writing', flush=True); time.sleep(60)\n"
            "atomic_write(%r, slow)") % (os.getcwd(), str(tmp_path / "res.json"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1                                             # being written by a live process ...
    assert clean_stale_temps(tmp_path) == []                          # ... so it is left alone
    proc.kill(); proc.wait()
    assert clean_stale_temps(tmp_path) == left and not any(tmp_path.iterdir())    # dead writer: removed


def test_json_refuses_nan_and_reports_torn_files(tmp_path):
    p = tmp_path / "a.json"
    with pytest.raises(ValueError):
        write_json_atomic(p, {"x": float("inf")})
    assert read_json(p) is None
    p.write_text('{"x": ')
    with pytest.warns(UserWarning, match="not valid JSON"):
        assert read_json(p) is None


# ---------------------------------------------------------------- checksummed tensor files and the keyed cache
@pytest.mark.parametrize("damage", ["flip", "truncate", "meta"])
def test_damaged_tensor_file_is_refused(tmp_path, damage):
    p = save_tensors(tmp_path / "t.safetensors", {"w": torch.randn(8, 8)}, {"note": "x"})
    raw = bytearray(p.read_bytes())
    if damage == "flip": raw[-5] ^= 0x40
    elif damage == "truncate": raw = raw[:-10]
    else:                                                            # metadata edited by hand
        assert b'\\"x\\"' in raw
        raw = raw.replace(b'\\"x\\"', b'\\"y\\"')
    p.write_bytes(bytes(raw))
    with pytest.raises(CorruptFile):
        load_tensors(p)


def test_tensor_cache_hit_miss_and_wrong_key(tmp_path):
    c = TensorCache(tmp_path, "test")
    key = {"model": "m", "layer": 1}
    assert c.load(key) is None
    c.save(key, {"z": torch.ones(2)}, {"n": 3})
    t, meta = c.load(key)
    assert torch.equal(t["z"], torch.ones(2)) and meta["n"] == 3 and meta["key"] == key
    os.replace(c.path(key), c.path({**key, "layer": 2}))
    with pytest.warns(UserWarning, match="differs in \\['layer'\\]"):
        assert c.load({**key, "layer": 2}) is None
    assert (c.hits, c.stored, c.corrupt) == (1, 1, 1)


# ---------------------------------------------------------------- identity
def test_fingerprint_deterministic_and_weight_sensitive():
    m = _tiny_llama()
    fp = model_fingerprint(m)
    assert fp == model_fingerprint(m) == model_fingerprint(_tiny_llama())
    assert fp != model_fingerprint(_tiny_llama(seed=1))
    assert fp != model_fingerprint(_tiny_llama(dtype=torch.bfloat16))


@pytest.mark.parametrize("layer", [0, 2])
def test_rank_one_edit_and_one_ulp_change_the_fingerprint(layer):
    m = _tiny_llama()
    before = model_fingerprint(m)
    W = m.model.layers[layer].mlp.down_proj.weight                  # (d_model, d_mlp)
    g = torch.Generator().manual_seed(layer)
    orig = W.clone()
    W += 1e-3 * torch.randn(W.shape[0], 1, generator=g) @ torch.randn(1, W.shape[1], generator=g)
    assert model_fingerprint(m) != before
    W.copy_(orig)
    assert model_fingerprint(m) == before
    W[5, 11] = torch.nextafter(W[5, 11], torch.tensor(10.0))
    assert model_fingerprint(m) != before
    assert model_fingerprint(m, replace={f"model.layers.{layer}.mlp.down_proj.weight": orig}) == before


def test_fingerprint_ignores_buffers_and_counts_tied_once():
    m = _tiny_llama()
    fp = model_fingerprint(m)
    assert "lm_head.weight" not in [n for n, _ in m.named_parameters()]   # tied: hashed once, as the embedding
    m.register_buffer("scratch", torch.zeros(3))
    m.scratch += 1
    assert model_fingerprint(m) == fp


def test_fingerprint_of_an_offloaded_model_is_that_of_the_model(tmp_path):
    from accelerate import disk_offload
    m = _tiny_llama()
    fp = model_fingerprint(m)
    disk_offload(m, str(tmp_path), execution_device="cpu")
    assert m.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    assert model_fingerprint(m) == fp


def test_model_id_and_tokenizer_fingerprint():
    m = _tiny_llama()
    fp = model_fingerprint(m)
    assert model_id(m, "HuggingFaceTB/SmolLM2-135M") == f"HuggingFaceTB--SmolLM2-135M--{fp}"
    assert model_id(m, "a b/c") == f"a_b--c--{fp}"
    m.config._name_or_path = "smollm2-135m-instruct"
    assert model_id(m) == f"smollm2-135m-instruct--{fp}"
    assert tokenizer_fingerprint(tiny_tokenizer("bpe")) == tokenizer_fingerprint(tiny_tokenizer("bpe"))
    assert tokenizer_fingerprint(tiny_tokenizer("bpe")) != tokenizer_fingerprint(tiny_tokenizer("sentencepiece"))
