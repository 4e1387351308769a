"""Run the unifiededit benchmarks, print their tables and write one JSON file.

    python benchmarks/run.py --quick --out DIR        # the quick suite (< 10 minutes on a 2-core CPU)
    python benchmarks/run.py --out DIR                # the full grid
    python benchmarks/run.py --quick --only values,solvers --out DIR
    python benchmarks/run.py --smoke --out DIR        # tiny sizes: checks that the scripts run (numbers meaningless)
    python benchmarks/run.py --gpu --out DIR          # scale on one GPU: 10,000 edits, a 7B-shaped model (< 8 min, H200)
    python benchmarks/run.py --gpu --smoke --out DIR  # the same code at tiny sizes, on any machine

Each suite measures the compared variants side by side, in this one process (the solver suite in a child process,
for clean peak-memory readings), on the same machine; the JSON records the machine, the torch threads, the device
and the load average before and after each suite. Every ratio's key starts with `speedup` and sits next to the raw
times it was computed from; `speedup_*_vs_*_limit` are fractions of a limit (1 = at the limit).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from _common import REPO, load, machine, matmul_rate, now, pick_device, write_json  # noqa: E402

SUITES = ("values", "stats", "solvers", "e2e")
GPU_SUITES = ("scale", "quality", "llama7b", "sweep", "solvers")
SIZES = {  # what each suite runs. --quick runs B = 32 and 128 with fewer steps (the reference loop's time for them is
           # its measured time per loss evaluation x their evaluations) and leaves the before/after profile to the full run
    "quick": dict(values=dict(batch_sizes=[1, 8, 32, 128], n_b1=2, n_serial=2, steps_by_B={32: 10, 128: 6}),
                  profile=None, stats=dict(n_tokens=8_192, repeat=2),
                  e2e=dict(edits=16, stats_tokens=20_000, label="--quick: a 16-edit batch, statistics from 20,000 tokens")),
    "full": dict(values=dict(batch_sizes=[1, 8, 32, 128], n_b1=8, n_serial=8),
                 profile=dict(B=8), stats=dict(n_tokens=65_536, repeat=3), e2e=dict(edits=256, stats_tokens=None)),
    "smoke": dict(values=dict(batch_sizes=[1, 4], n_b1=2, n_serial=1, steps_by_B={1: 3, 4: 3}),
                  profile=dict(B=4, steps=3), stats=dict(n_tokens=4096, repeat=1),
                  e2e=dict(edits=4, stats_tokens=4096, label="--smoke: plumbing check only")),
    # --gpu: scale on one GPU (issue 12); sized for < 8 minutes on one H200, every suite with a time budget
    "gpu": dict(records=10_000,
                scale=dict(n_serial=2, steps=None, time_budget=200,
                           precisions={"float32": [1, 64, 256, 1024, 10_000], "tf32": [1024, 10_000],
                                       "bfloat16": [1024, 10_000]}),
                quality=dict(n_records=256, precisions=["float32", "tf32", "bfloat16"], stats_tokens=100_000),
                llama7b=dict(smoke=False, batch_sizes=[1, 64, 256, 1024], steps=25, stats_tokens=32_768,
                             keys_edits=256, time_budget=150),
                sweep=dict(n_records=10_000, stats_tokens=100_000, methods=["emmet", "memit"])),
    "gpu-smoke": dict(records=16,
                      scale=dict(n_serial=1, steps=3, time_budget=600, precisions={"float32": [1, 8], "bfloat16": [8]}),
                      quality=dict(n_records=4, precisions=["float32", "bfloat16"], stats_tokens=4096),
                      llama7b=dict(smoke=True, batch_sizes=[1, 4], steps=3, stats_tokens=2048, keys_edits=4,
                                   time_budget=600),
                      sweep=dict(n_records=4, stats_tokens=4096, methods=["emmet", "memit"])),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description="unifiededit benchmarks: print tables, write JSON")
    ap.add_argument("--quick", action="store_true", help="the quick suite (smaller grids; < 10 minutes on 2 CPU cores)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes that check the scripts run (numbers meaningless)")
    ap.add_argument("--gpu", action="store_true", help=f"the scale suites ({','.join(GPU_SUITES)}): 10,000 edits and a "
                    "7B-shaped model on one GPU (with --smoke: tiny sizes, any device)")
    ap.add_argument("--out", required=True, help="directory for the JSON (quick-<device>.json or full-<device>.json)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(SUITES)} "
                    f"(with --gpu: of {','.join(GPU_SUITES)})")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto (CUDA when present)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all usable cores)")
    ap.add_argument("--data", default=None, help="a folder with the full data files (counterfact/counterfact_500.json, "
                    "wikitext/wiki.test.raw, counterfact/easyedit-counterfact-{edit,train}.json for --gpu); default: "
                    "the samples bundled with the package (for --gpu at full size, too few records)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a name or path load_pretrained accepts")
    a = ap.parse_args(argv)
    known = GPU_SUITES if a.gpu else SUITES
    only = [s.strip() for s in (a.only or ",".join(known)).split(",") if s.strip()]
    bad = [s for s in only if s not in known]
    if bad: ap.error(f"unknown suite(s) {bad}: choose from {known}")
    device = pick_device(a.device)
    threads = a.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    size = ("gpu-smoke" if a.smoke else "gpu") if a.gpu else "smoke" if a.smoke else "quick" if a.quick else "full"
    cfg = SIZES[size]
    cf, wiki, edit_files = data_files(a.data, cfg.get("records", 0) if a.gpu else 0, ap.error)
    out_dir = Path(a.out)
    out_path = out_dir / f"{size}-{device.type}.json"
    log = lambda *x: print(*x, flush=True)

    t_start = time.perf_counter()
    res = dict(suite=size, sizes=cfg, started=now(), command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
               machine=machine(device), load_average_start=load(), suites={})
    log(f"unifiededit benchmarks ({res['suite']}) on {res['machine']['device_name']} ({device}), "
        f"{threads} torch threads, load average {res['load_average_start']}")
    res["matmul_float32_samples"] = []

    def limit() -> dict:
        # the limit is the best rate seen so far in this run: a slow moment of a shared machine must not make the
        # other numbers look closer to it
        r = matmul_rate(device, torch.float32)
        res["matmul_float32_samples"].append(dict(r, at=now()))
        res["matmul_float32"] = max(res["matmul_float32_samples"], key=lambda x: x["flops_per_s"])
        return res["matmul_float32"]

    limit()
    log(f"plain float32 matmul (2048^3): {res['matmul_float32']['flops_per_s'] / 1e9:.1f} GFLOP/s")

    model = tok = reqs = None
    if any(s in only for s in ("values", "stats", "e2e")):
        from unifiededit.data import load_counterfact
        from unifiededit.pretrained import load_pretrained
        model, tok = load_pretrained(a.model, device=device)
        reqs = load_counterfact(cf).requests()

    def record(name, fn):
        t0, l0 = time.perf_counter(), load()
        r = fn()
        r.update(seconds_suite=time.perf_counter() - t0, load_average_before=l0, load_average_after=load())
        res["suites"][name] = r
        write_json(out_path, res)                     # partial results survive an interrupted run
        return r

    if a.gpu:
        scale_suites(a, size, cfg, only, edit_files, wiki, device, res, record, log)
        only = [s for s in only if s == "solvers"]
    if "values" in only:
        import bench_values
        v = record("values", lambda: bench_values.run(model, tok, reqs, device, limit(), cfg["values"], log))
        bench_values.print_tables(v, log)
    if "values" in only and cfg["profile"]:
        log(f"profiling the slowest phase (values): before/after on the same {cfg['profile']['B']} edits")
        record("profile", lambda: bench_values.before_after(model, tok, reqs, device, cfg["profile"], log))
        p = res["suites"]["profile"]
        log(f"values, {p['edits']} edits: before {p['seconds_before']:.1f} s, after {p['seconds_after']:.1f} s "
            f"(x{p['speedup_after_vs_before']:.1f}); top ops after: "
            + ", ".join(f"{o['op']} {o['share']:.0%}" for o in p["profile_after_top_ops"][:4]))
        write_json(out_path, res)
    if "stats" in only:
        import bench_stats
        s = record("stats", lambda: bench_stats.run(model, tok, wiki, device, limit(), cfg["stats"], log))
        bench_stats.print_tables(s, log)
    if "e2e" in only:
        import bench_e2e
        e = record("e2e", lambda: bench_e2e.run(model, tok, reqs, wiki, device, cfg["e2e"], log))
        bench_e2e.print_tables(e, log)
    if "solvers" in only:
        import bench_solvers
        del model
        with tempfile.TemporaryDirectory() as tmp:
            js = Path(tmp) / "solvers.json"
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
                       PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
            solver_size = {"gpu": "gpu", "gpu-smoke": "smoke"}.get(size, size)
            cmd = [sys.executable, str(HERE / "bench_solvers.py"), "--device", str(device), "--threads", str(threads),
                   "--json", str(js), "--size", solver_size]
            t0, l0 = time.perf_counter(), load()
            subprocess.run(cmd, env=env, check=True)          # prints its progress and tables on stderr
            r = json.loads(js.read_text())
            r.update(seconds_suite=time.perf_counter() - t0, load_average_before=l0, load_average_after=load(),
                     process="child process with MALLOC_MMAP_THRESHOLD_=65536 (exact CPU peak-memory readings)")
            res["suites"]["solvers"] = r
    res.update(seconds_total=time.perf_counter() - t_start, load_average_end=load(), finished=now())
    write_json(out_path, res)
    log(f"\n{res['suite']} suite done in {res['seconds_total']:.0f} s; load average {res['load_average_end']}; "
        f"wrote {out_path}")
    return res


def data_files(folder: str | None, n_records: int, error) -> tuple[Path, Path, list[Path]]:
    """CounterFact (500 records), WikiText-2's test split and the EasyEdit files the --gpu suites sample from: from
    `folder` (the full files), or the samples bundled with the package; `error` if they hold fewer than `n_records`."""
    from unifiededit.datafiles import sample_path
    if folder is None:
        cf, wiki, edit = sample_path("counterfact-500"), sample_path("wikitext-2-test"), [sample_path("easyedit-counterfact-val")]
        have = 1_919
    else:
        d = Path(folder)
        cf, wiki = d / "counterfact" / "counterfact_500.json", d / "wikitext" / "wiki.test.raw"
        edit = [d / "counterfact" / f"easyedit-counterfact-{s}.json" for s in ("edit", "train")]
        have = 20_000
        for p in (cf, wiki, *(edit if n_records else ())):
            if not p.is_file(): error(f"--data {folder}: {p} not found")
    if n_records > have:
        error(f"the --gpu suites sample {n_records:,} records: the bundled samples hold {have:,}; pass --data DIR with "
              "counterfact/easyedit-counterfact-edit.json and -train.json (EasyEdit's CounterFact files)")
    return cf, wiki, edit


def scale_suites(a, size, cfg, only, edit_files, wiki, device, res, record, log):
    "The --gpu suites (bench_scale): SmolLM2 values at scale, precision quality, a 7B-shaped model, a sweep."
    import bench_scale
    from unifiededit.data import load_dataset
    from unifiededit.pretrained import load_pretrained
    from unifiededit.corpus import file_corpus
    from unifiededit.stats import collect_key_stats
    from unifiededit.hparams import HParams
    records = load_dataset(edit_files).sample(cfg["records"], seed=0)
    reqs = [r.request for r in records]
    log(f"{len(records):,} distinct-subject CounterFact records (EasyEdit files)")
    model, tok = load_pretrained(a.model, device=device)
    if "scale" in only:
        record("scale", lambda: dict(values_grid=bench_scale.values_grid(model, tok, reqs, device, cfg["scale"], log)))
    if "quality" in only:
        q = cfg["quality"]
        stats = collect_key_stats(model, tok, HParams.for_model(model, "emmet").layers, file_corpus(wiki),
                                  n_tokens=q["stats_tokens"], progress=False)
        record("quality", lambda: bench_scale.precision_quality(model, tok, records, stats, device, q, log))
    if "sweep" in only:
        record("sweep", lambda: bench_scale.sweep(model, tok, records, wiki, device, cfg["sweep"], log))
    if "llama7b" in only:
        del model
        if device.type == "cuda": torch.cuda.empty_cache()
        record("llama7b", lambda: dict(llama7b=bench_scale.llama7b(tok, reqs, wiki, device, cfg["llama7b"], log)))
    bench_scale.print_tables({**res["suites"].get("scale", {}), **res["suites"].get("llama7b", {})}, log)


if __name__ == "__main__":
    main()
