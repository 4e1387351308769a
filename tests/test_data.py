"""Tests of unifiededit.datafiles and unifiededit.data: the bundled samples, loaders, schema errors, sampling, atomic
checksummed downloads."""
import hashlib
import http.server
import json
import random
import re
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

import unifiededit.datafiles as DF
from unifiededit.data import (AttributeSnippets, EditDataset, EditRecord, TfidfStats, detect_format,
                              load_attribute_snippets, load_counterfact, load_dataset, load_easyedit_counterfact,
                              load_tfidf_stats, load_zsre, parse_counterfact, parse_easyedit, parse_zsre)
from unifiededit.datafiles import CorruptFile, SAMPLES, data_path, fetch, resolve_path, sample_path


@pytest.fixture(scope="module")
def cf_raw():
    return json.loads((sample_path("counterfact-500")).read_text())


@pytest.fixture(scope="module")
def zsre_raw():
    return json.loads((sample_path("zsre-1k")).read_text())


@pytest.fixture(scope="module")
def ee_raw():
    return json.loads((sample_path("easyedit-counterfact-val")).read_text())


# ---------------------------------------------------------------- loaders on the bundled samples
def test_counterfact_500(cf_raw):
    ds = load_counterfact(sample_path("counterfact-500"))
    assert len(ds) == 500
    for rec, raw in zip(ds, cf_raw):
        rr = raw["requested_rewrite"]
        assert rec.case_id == raw["case_id"]
        assert rec.request == {"case_id": raw["case_id"], "prompt": rr["prompt"], "subject": rr["subject"],
                               "target_new": rr["target_new"], "target_true": rr["target_true"]}
        assert rec.rewrite_prompt == rr["prompt"].format(rr["subject"])
        assert list(rec.paraphrase_prompts) == raw["paraphrase_prompts"]
        assert list(rec.neighborhood_prompts) == raw["neighborhood_prompts"]
        assert set(rec.neighborhood_answers) == {rr["target_true"]["str"]}
        assert list(rec.generation_prompts) == raw["generation_prompts"]
        assert list(rec.attribute_prompts) == raw["attribute_prompts"]
        assert (rec.relation_id, rec.target_new_id) == (rr["relation_id"], rr["target_new"]["id"])
    assert {len(r.paraphrase_prompts) for r in ds} == {2} and {len(r.neighborhood_prompts) for r in ds} == {10}


def test_counterfact_folder_path(tmp_path):
    (tmp_path / "counterfact.json").write_text((sample_path("counterfact-500")).read_text())
    assert len(load_counterfact(tmp_path, size=7)) == 7
    (tmp_path / "multi_counterfact.json").write_text(json.dumps(json.loads((tmp_path / "counterfact.json").read_text())[:3]))
    assert len(load_counterfact(tmp_path, multi=True)) == 3


def test_easyedit_sample(ee_raw):
    ds = load_easyedit_counterfact("sample:easyedit-counterfact-val")
    assert len(ds) == len(ee_raw) == 1919 and len({r.case_id for r in ds}) == 1919
    for rec, raw in zip(ds, ee_raw):
        assert rec.request == {"case_id": raw["case_id"], "prompt": raw["prompt"].replace(raw["subject"], "{}", 1),
                               "subject": raw["subject"], "target_new": {"str": raw["target_new"]},
                               "target_true": {"str": raw["ground_truth"]}}
        assert rec.rewrite_prompt == raw["prompt"] and rec.paraphrase_prompts == (raw["rephrase_prompt"],)
        assert rec.neighborhood_prompts == (raw["locality_prompt"],)
        assert rec.neighborhood_answers == (raw["locality_ground_truth"],) and rec.source == "easyedit"


def test_easyedit_matches_counterfact():
    """Where EasyEdit's validation split and counterfact_500.json share a case, the two formats describe it alike."""
    cf = load_counterfact("sample:counterfact-500")
    ee = load_easyedit_counterfact("sample:easyedit-counterfact-val")
    both = [r for r in cf if r.case_id in {e.case_id for e in ee}]
    assert len(both) == 45
    for r in both:
        e = ee.by_case_id(r.case_id)
        assert (e.prompt, e.subject, e.target_new, e.target_true) == (r.prompt, r.subject, r.target_new, r.target_true)
        assert e.neighborhood_prompts[0] in r.neighborhood_prompts


def test_zsre(zsre_raw):
    ds = load_zsre(sample_path("zsre-1k"))
    assert len(ds) == 1000
    for i, (rec, raw) in enumerate(zip(ds, zsre_raw)):
        assert rec.case_id == i and rec.source == "zsre"
        assert rec.rewrite_prompt == raw["src"] and rec.target_new == raw["answers"][0] and rec.target_true is None
        assert rec.paraphrase_prompts == (raw["rephrase"],)
        assert rec.neighborhood_prompts == (raw["loc"] + "?",) and rec.neighborhood_answers == (raw["loc_ans"],)
    assert ds[0].request == {"case_id": 0, "prompt": "What is the product made by {}?", "subject": "UniFirst",
                             "target_new": {"str": "uniform"}, "target_true": None}
    with pytest.warns(UserWarning, match=r"2 record\(s\) have an empty alt and are left out \(positions \[534, "):
        alt = load_zsre(sample_path("zsre-1k"), target="alt")
    assert (alt[0].target_new, alt[0].target_true) == (zsre_raw[0]["alt"], zsre_raw[0]["answers"][0])
    assert len(alt) == 998 and 534 not in {r.case_id for r in alt}       # nothing to edit towards
    with pytest.raises(ValueError, match="'answers' or 'alt'"):
        parse_zsre(zsre_raw[:1], target="pred")


def test_detect_format(cf_raw, zsre_raw, ee_raw):
    assert detect_format(cf_raw) == "counterfact" and detect_format(zsre_raw) == "zsre" and detect_format(ee_raw) == "easyedit"
    with pytest.raises(ValueError, match="unknown record format with fields \\['a'\\]"):
        detect_format([{"a": 1}])
    with pytest.raises(ValueError, match="non-empty JSON list"):
        detect_format({"a": 1})


def test_load_dataset_auto():
    ds = load_dataset(sample_path("zsre-1k"), size=5)
    assert len(ds) == 5 and ds[4].source == "zsre"
    with pytest.raises(ValueError, match="case_id 10 appears twice \\(items 0 and 1919\\)"):
        load_dataset([sample_path("easyedit-counterfact-val")] * 2)


# ---------------------------------------------------------------- schema errors name the field and the record
def _copy(x):
    return json.loads(json.dumps(x))


@pytest.mark.parametrize("path,field", [
    (("requested_rewrite", "target_true"), "requested_rewrite.target_true.str"),
    (("requested_rewrite", "subject"), "requested_rewrite.subject"),
    (("paraphrase_prompts",), "paraphrase_prompts"),
    (("neighborhood_prompts",), "neighborhood_prompts"),
    (("case_id",), "case_id"),
])
def test_counterfact_missing_field(cf_raw, path, field):
    raw = _copy(cf_raw[:4])
    d = raw[3]
    for k in path[:-1]: d = d[k]
    del d[path[-1]]
    where = "record 3" + ("" if field == "case_id" else f" (case_id={cf_raw[3]['case_id']})")
    with pytest.raises(ValueError, match=re.escape(f"{where} is missing field '{field}'")):
        parse_counterfact(raw)


def test_counterfact_bad_types(cf_raw):
    raw = _copy(cf_raw[:2]); raw[1]["paraphrase_prompts"] = "not a list"
    with pytest.raises(ValueError, match="record 1 .*'paraphrase_prompts' should be list"):
        parse_counterfact(raw)
    raw = _copy(cf_raw[:2]); raw[0]["neighborhood_prompts"][4] = {"prompt": "x"}
    with pytest.raises(ValueError, match="record 0 .*'neighborhood_prompts' should hold strings"):
        parse_counterfact(raw)
    raw = _copy(cf_raw[:2]); raw[1]["requested_rewrite"]["prompt"] = "Angola is located in"
    with pytest.raises(ValueError, match="record 1 .*must contain one '\\{\\}'"):
        parse_counterfact(raw)
    with pytest.raises(ValueError, match="expected a JSON list"):
        parse_counterfact({"case_id": 1})


def test_easyedit_errors(ee_raw):
    raw = _copy(ee_raw[:3]); del raw[2]["ground_truth"]
    with pytest.raises(ValueError, match=f"record 2 \\(case_id={ee_raw[2]['case_id']}\\) is missing field 'ground_truth'"):
        parse_easyedit(raw)
    raw = _copy(ee_raw[:3]); del raw[1]["locality_ground_truth"]
    with pytest.raises(ValueError, match="record 1 .*missing field 'locality_ground_truth'"):
        parse_easyedit(raw)
    raw = _copy(ee_raw[:3]); raw[0]["subject"] = "Somebody Else"
    with pytest.raises(ValueError, match="record 0 .*subject 'Somebody Else' does not occur in prompt"):
        parse_easyedit(raw)


def test_zsre_errors(zsre_raw):
    raw = _copy(zsre_raw[:3]); del raw[2]["rephrase"]
    with pytest.raises(ValueError, match="zsRE: record 2 is missing field 'rephrase'"):
        parse_zsre(raw)
    raw = _copy(zsre_raw[:3]); raw[1]["loc"] = "who wrote hamlet"
    with pytest.raises(ValueError, match="record 1 field 'loc' should be a Natural Questions prompt"):
        parse_zsre(raw)
    raw = _copy(zsre_raw[:3]); raw[0]["answers"] = []
    with pytest.raises(ValueError, match="record 0 field 'answers' should be a non-empty list"):
        parse_zsre(raw)


def test_file_level_error_names_file(tmp_path, cf_raw):
    raw = _copy(cf_raw[:2]); del raw[1]["paraphrase_prompts"]
    p = tmp_path / "cf.json"; p.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"{p}: CounterFact: record 1 .* missing field 'paraphrase_prompts'"):
        load_counterfact(p)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_dataset(tmp_path / "broken.json")


def test_edit_record_checks():
    with pytest.raises(ValueError, match="exactly one '\\{\\}'"):
        EditRecord(1, "X", "{} and {}", "a", "b")
    with pytest.raises(TypeError, match="not an EditRecord"):
        EditDataset([{"case_id": 1}])


# ---------------------------------------------------------------- seeded unique-subject sampling
def test_sampling_deterministic_and_unique():
    ds = load_easyedit_counterfact(sample_path("easyedit-counterfact-val"))
    ids = lambda d: [r.case_id for r in d]
    random.seed(123); a = ds.sample(100, seed=7)
    random.seed(999); b = ds.sample(100, seed=7)          # the global RNG does not matter
    assert ids(a) == ids(b)
    assert ids(a) != ids(ds.sample(100, seed=8))
    assert len({r.subject for r in a}) == 100
    assert ids(ds.sample(50, seed=7)) == ids(a)[:50]        # a smaller sample is a prefix of the larger one
    assert ids(ds.sample(100, seed=7)) == ids(a)


def test_sampling_subject_constraint():
    cf = load_counterfact(sample_path("counterfact-500"))
    subjects = [r.subject for r in cf]
    assert len(set(subjects)) == 498                        # two subjects repeat in this file
    assert len({r.subject for r in cf.sample(498, seed=0)}) == 498
    with pytest.raises(ValueError, match="cannot sample 499 records with distinct subjects .* only 498 available"):
        cf.sample(499, seed=0)
    assert len(cf.sample(500, seed=0, unique_subjects=False)) == 500
    with pytest.raises(ValueError, match="non-negative int"):
        cf.sample(-1)


def test_sampling_handcrafted():
    recs = [EditRecord(i, s, "{} is", "a", "b") for i, s in enumerate(["A", "A", "B", "A", "C"])]
    ds = EditDataset(recs)
    for seed in range(20):
        smp = ds.sample(3, seed=seed)
        assert sorted(r.subject for r in smp) == ["A", "B", "C"]
    assert {tuple(r.case_id for r in ds.sample(3, seed=s)) for s in range(20)} != {(0, 2, 4)}  # seeds matter


# ---------------------------------------------------------------- downloads: once, atomically, clear offline error
class _Server:
    def __init__(self, files: dict, truncate: set = frozenset()):
        self.hits = []
        files_, hits, trunc = files, self.hits, truncate

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                hits.append(name)
                if name not in files_:
                    self.send_response(404); self.end_headers(); return
                body = files_[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (100 if name in trunc else 0)))
                self.end_headers()
                self.wfile.write(body)
            def log_message(self, *a): pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data/dsets"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown(); self.httpd.server_close()


def test_fetch_downloads_once(tmp_path):
    body = json.dumps([{"x": 1}]).encode()
    srv = _Server({"counterfact.json": body})
    try:
        p = fetch("counterfact.json", tmp_path, base_url=srv.url)
        assert p == tmp_path / "counterfact.json" and p.read_bytes() == body
        assert fetch("counterfact.json", tmp_path, base_url=srv.url) == p
        assert srv.hits == ["counterfact.json"]                 # the second call used the cache
        assert sorted(f.name for f in tmp_path.iterdir()) == ["counterfact.json", "counterfact.json.sha256.json"]
        rec = json.loads((tmp_path / "counterfact.json.sha256.json").read_text())   # no temporary file left
        assert rec == {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body), "url": f"{srv.url}/counterfact.json"}
    finally:
        srv.close()


def test_fetch_truncated_download_leaves_nothing(tmp_path):
    srv = _Server({"idf.npy": b"0123456789"}, truncate={"idf.npy"})
    try:
        with pytest.raises(ConnectionError, match="idf.npy"):
            fetch("idf.npy", tmp_path, base_url=srv.url, timeout=5)
        assert list(tmp_path.iterdir()) == []
        with pytest.raises(ConnectionError, match="404"):
            fetch("tfidf_vocab.json", tmp_path, base_url=srv.url, timeout=5)
        assert list(tmp_path.iterdir()) == []
    finally:
        srv.close()


def test_fetch_offline_error(tmp_path):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    url = f"http://127.0.0.1:{port}/dsets"
    with pytest.raises(ConnectionError) as e:
        fetch("counterfact.json", tmp_path, base_url=url, timeout=5)
    msg = str(e.value)
    assert f"{url}/counterfact.json" in msg and "pass its local path" in msg
    assert list(tmp_path.iterdir()) == []


def test_loader_uses_cache(tmp_path, monkeypatch):
    (tmp_path / "zsre_mend_eval.json").write_text((sample_path("zsre-1k")).read_text())
    assert len(load_zsre(cache_dir=tmp_path)) == 1000         # no network needed once cached
    monkeypatch.setenv("UNIFIEDEDIT_DATA", str(tmp_path))
    assert len(load_zsre(size=3)) == 3


def test_resolve_path(tmp_path):
    (tmp_path / "counterfact.json").write_text("[]")
    assert resolve_path(tmp_path, "counterfact.json") == tmp_path / "counterfact.json"
    assert resolve_path(tmp_path / "counterfact.json", "whatever.json") == tmp_path / "counterfact.json"
    with pytest.raises(FileNotFoundError, match="multi_counterfact.json"):
        resolve_path(tmp_path, "multi_counterfact.json")


def test_fetch_refuses_a_damaged_or_wrong_file(tmp_path):
    """A cached download that changed on disk is refused (not parsed); a download whose hash is not the one asked
    for leaves nothing behind; the right hash is accepted, and a mismatch against a cached file is refused."""
    body = json.dumps([{"x": 1}]).encode()
    srv = _Server({"zsre_mend_eval.json": body})
    try:
        with pytest.raises(CorruptFile, match="expected 00"):
            fetch("zsre_mend_eval.json", tmp_path, base_url=srv.url, sha256="00" * 32)
        assert list(tmp_path.iterdir()) == []
        good = hashlib.sha256(body).hexdigest()
        p = fetch("zsre_mend_eval.json", tmp_path, base_url=srv.url, sha256=good)
        assert p.read_bytes() == body
        with pytest.raises(CorruptFile, match="but sha256='11"):
            fetch("zsre_mend_eval.json", tmp_path, base_url=srv.url, sha256="11" * 32)
        p.write_bytes(body[:-1] + b" ")                          # same size, one byte changed
        with pytest.raises(CorruptFile, match="damaged or replaced"):
            load_zsre(cache_dir=tmp_path)
        assert srv.hits == ["zsre_mend_eval.json"] * 2           # refused, never silently downloaded again
    finally:
        srv.close()


def test_fetch_takes_a_file_placed_by_hand(tmp_path):
    "The offline error asks the user to put the file in the cache: it is taken, and its hash recorded then."
    (tmp_path / "counterfact.json").write_bytes(sample_path("counterfact-500").read_bytes())
    assert len(load_counterfact(cache_dir=tmp_path)) == 500
    rec = json.loads((tmp_path / "counterfact.json.sha256.json").read_text())
    assert rec["sha256"] == SAMPLES["counterfact-500"].sha256 and rec["url"] is None
    (tmp_path / "counterfact.json").write_text("[]")
    with pytest.raises(CorruptFile):
        load_counterfact(cache_dir=tmp_path)
    for bad in ("", "../counterfact.json", "a/b.json", None):
        with pytest.raises(ValueError, match="plain file name"):
            fetch(bad, tmp_path)


# ---------------------------------------------------------------- the bundled samples
def test_every_sample_is_bundled_intact_and_documented():
    """Each sample's bytes match the size and SHA-256 in the code; SOURCES.md lists each file with that SHA-256 and
    a licence; the samples folder holds nothing else (so nothing undocumented ships)."""
    folder = DF.samples_dir()
    sources = (folder / "SOURCES.md").read_text(encoding="utf-8")
    for name, s in SAMPLES.items():
        p = sample_path(name)
        assert p.parent == folder and p.name == s.file
        assert p.stat().st_size == s.size and hashlib.sha256(p.read_bytes()).hexdigest() == s.sha256
        row = next(l for l in sources.splitlines() if l.startswith(f"| `{name}` |"))
        assert f"`{s.file}`" in row and f"`{s.sha256}`" in row and ("MIT" in row or "CC BY-SA" in row), row
    assert sorted(p.name for p in folder.iterdir() if p.name != "__pycache__") == sorted(
        [s.file for s in SAMPLES.values()] + ["SOURCES.md"])


def test_sample_references(cf_raw):
    assert data_path("sample:counterfact-500") == sample_path("counterfact-500")
    assert data_path("counterfact-500") == Path("counterfact-500")            # without the prefix: a path
    assert [r.case_id for r in load_counterfact("sample:counterfact-500")] == [r["case_id"] for r in cf_raw]
    assert load_dataset(["sample:zsre-1k"]).name == "sample:zsre-1k"
    assert resolve_path("sample:zsre-1k", "zsre_mend_eval.json") == sample_path("zsre-1k")
    for bad in ("sample:", "sample:cf", "sample:COUNTERFACT-500"):
        with pytest.raises(ValueError, match="is not a bundled sample: use one of"):
            load_dataset(bad)
    with pytest.raises(FileNotFoundError, match="no data file at nowhere.json .*sample:counterfact-500"):
        load_dataset("nowhere.json")


def test_a_damaged_sample_is_refused(tmp_path, monkeypatch):
    import shutil
    copy = tmp_path / "samples"; shutil.copytree(DF.samples_dir(), copy)
    monkeypatch.setattr(DF, "samples_dir", lambda: copy)
    assert sample_path("zsre-1k") == copy / "zsre_mend_train-1k.json"
    with open(copy / "zsre_mend_train-1k.json", "r+b") as f: f.seek(1000); f.write(b"#")
    with pytest.raises(CorruptFile, match="the bundled sample 'zsre-1k' .* has SHA-256"):
        load_zsre("sample:zsre-1k")
    (copy / "wiki.test.raw").write_text("short")
    with pytest.raises(CorruptFile, match="has 5 bytes, expected 1,290,547"):
        sample_path("wikitext-2-test")
    (copy / "counterfact_500.json").unlink()
    with pytest.raises(FileNotFoundError, match="reinstall unifiededit"):
        sample_path("counterfact-500")


# ---------------------------------------------------------------- attribute snippets, tf-idf statistics
def test_snippets_and_tfidf(tmp_path):
    (tmp_path / "attribute_snippets.json").write_text(json.dumps([
        {"relation_id": "P30", "target_id": "Q51", "samples": [{"name": "Ross Island", "text": "In Antarctica."}]},
        {"relation_id": "P30", "target_id": "Q51", "samples": [{"name": "Vostok", "text": "Cold."}]}]))
    sn = load_attribute_snippets(tmp_path)
    assert sn.texts("P30", "Q51") == ["In Antarctica.", "Cold."] and sn.texts("P17", "Q51") == []
    with pytest.raises(ValueError, match="entry 0 is missing field 'samples'"):
        AttributeSnippets([{"relation_id": "P30", "target_id": "Q51"}])
    np.save(tmp_path / "idf.npy", np.array([1.5, 2.5], dtype=np.float32))
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps({"cold": 0, "antarctica": 1}))
    st = load_tfidf_stats(tmp_path, tmp_path)
    assert st.idf.dtype == np.float64 and st.vocab == {"cold": 0, "antarctica": 1}
    with pytest.raises(ValueError, match="outside idf"):
        TfidfStats(np.ones(2), {"x": 2})


def test_a_missing_full_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="data archive linked from EasyEdit's README"):
        load_easyedit_counterfact(tmp_path / "counterfact-edit.json")
