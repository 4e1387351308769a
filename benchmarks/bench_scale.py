"""Scale (issue 12): what researchers run on one GPU — thousands of edits, 7B-class models.

- `values_grid`: target values of SmolLM2 edits at B = 1 ... 10,000 (one call each, chunks sized from free memory):
  edits/s, seconds for all of them, FLOP/s as a fraction of the device's matrix-product rate *in the dtype the
  products run in*, peak memory; the reference loop on a few edits for the ratio; float32 vs TF32 vs bfloat16.
- `precision_quality`: one EMMET batch of CounterFact edits with the target values of each precision, evaluated
  (ES/PS/NS with 95 % intervals): a faster option is acceptable only if it stays within the float32 run's intervals.
- `llama7b`: a Llama-2-7B-shaped model built from its config with random bfloat16 weights on the device (nothing is
  downloaded; speed does not depend on the weights): key statistics vs a truncated forward pass, target values per
  edit at B = 1 ... 1,024, keys, peak memory.
- `sweep`: `run_sweep` of N CounterFact edits with EMMET and MEMIT on one layer, evaluation included.

Every suite also runs at tiny sizes on a CPU (`run.py --gpu --smoke`), so CI checks the code paths; the numbers that
matter come from `run.py --gpu` on a GPU."""
from __future__ import annotations

import math
import time

import torch

from _common import Clock, PeakMemory, matmul_rate, ratio, table

from unifiededit.hparams import HParams
from unifiededit.keys import ContextTemplates, compute_keys
from unifiededit.batched_values import compute_target_values
from unifiededit.values import compute_target_values_serial, value_prompts


def _flops_per_eval(model, tok, reqs, layer, tmpl, hook, precision) -> float:
    "Matrix-product FLOPs of one loss evaluation (forward + backward) per edit, from 2- and 3-evaluation runs."
    from torch.utils.flop_counter import FlopCounterMode
    def count(n):
        with FlopCounterMode(display=False) as fc:
            compute_target_values(model, tok, reqs, layer, tmpl, hook=hook, v_num_grad_steps=n, early_stop_loss=-1.0,
                                  precision=precision, progress=False)
        return float(fc.get_total_flops())
    return (count(3) - count(2)) / len(reqs)


def _dtype_of(precision: str):
    return {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16}[precision]


def _rate(device, precision: str) -> dict:
    "The device's plain matrix-product rate in the arithmetic `precision` uses (TF32 switched on for 'tf32')."
    if precision == "tf32" and device.type == "cuda":
        from unifiededit.values import forward_precision
        with forward_precision(device, "tf32"): return matmul_rate(device, torch.float32)
    return matmul_rate(device, _dtype_of(precision))


def values_grid(model, tok, reqs, device, cfg: dict, log=print) -> dict:
    """cfg: batch_sizes, n_serial (edits through the reference loop), precisions {name: [B, ...]}, steps (None: the
    hyper-parameters'), time_budget (seconds; configurations not started by then are reported as skipped)."""
    hp = HParams.for_model(model, "emmet")
    layer, hook = hp.layers[-1], "rewrite"
    steps = cfg.get("steps") or hp.v_num_grad_steps
    tmpl = ContextTemplates.memit(model, tok, seed=0)
    t0, rows, skipped = time.perf_counter(), [], []
    serial = []
    for e in range(cfg["n_serial"]):
        with Clock(device) as c:
            tv = compute_target_values_serial(model, tok, reqs[e:e + 1], layer, tmpl, hook=hook, v_num_grad_steps=steps)
        serial.append(dict(seconds=c.wall, evals=int(tv.n_steps[0]) + 1))
    s_per_eval = sum(s["seconds"] for s in serial) / max(1, sum(s["evals"] for s in serial))
    rates, flops = {}, {}
    for precision, sizes in cfg["precisions"].items():
        rates[precision] = _rate(device, precision)
        flops[precision] = _flops_per_eval(model, tok, reqs[:2], layer, tmpl, hook, precision)
        for B in sizes:
            if time.perf_counter() - t0 > cfg["time_budget"]:
                skipped.append(dict(B=B, precision=precision, why="time budget")); continue
            with PeakMemory(device) as pm, Clock(device) as c:
                tv = compute_target_values(model, tok, reqs[:B], layer, tmpl, hook=hook, v_num_grad_steps=steps,
                                           precision=precision, progress=False)
            evals = int((tv.n_steps + 1).sum())
            fl = flops[precision] * evals
            row = dict(B=B, precision=precision, edits=B, v_num_grad_steps=steps, seconds=c.wall,
                       edits_per_s=B / c.wall, mean_evals_per_edit=evals / B, peak_memory_bytes=pm.bytes,
                       reference_seconds_estimate=s_per_eval * evals,
                       speedup_batched_vs_serial=s_per_eval * evals / c.wall,
                       flops_per_s=fl / c.wall, matmul_flops_per_s=rates[precision]["flops_per_s"],
                       speedup_vs_matmul_limit=ratio(fl / c.wall, rates[precision]["flops_per_s"]),
                       prob_final_mean=float(tv.prob_final.mean()))
            rows.append(row)
            log(f"  values B={B:5d} {precision:8s}: {c.wall:7.1f} s, {row['edits_per_s']:8.2f} edits/s, "
                f"x{row['speedup_batched_vs_serial']:.1f} vs the reference loop, "
                f"{row['speedup_vs_matmul_limit']:.2f} of the {precision} matmul rate")
    return dict(layer=layer, hook=hook, n_templates=len(tmpl), serial=serial, reference_seconds_per_eval=s_per_eval,
                flops_per_eval_per_edit=flops, matmul=rates, rows=rows, skipped=skipped,
                note="reference_seconds_estimate: the reference loop's measured seconds per loss evaluation x the "
                     "evaluations of these edits (both take the same steps in float32)")


def precision_quality(model, tok, records, stats, device, cfg: dict, log=print) -> dict:
    "cfg: n_records (one EMMET batch), precisions. ES/PS/NS (mean and 95 % half-width) per precision."
    from unifiededit.editing import edit
    from unifiededit.metrics import evaluate
    recs = list(records)[:cfg["n_records"]]
    hp = HParams.for_model(model, "emmet")
    tmpl = ContextTemplates.memit(model, tok, seed=0)
    out = {}
    for precision in cfg["precisions"]:
        with Clock(device) as c:
            tv = compute_target_values(model, tok, [r.request for r in recs], hp.layers[-1], tmpl, hook="rewrite",
                                       precision=precision, progress=False)
        e = edit(model, tok, [r.request for r in recs], hparams=hp, stats=stats, templates=tmpl, values=tv,
                 progress=False)
        s = evaluate(model, tok, recs).summary()
        e.revert()
        out[precision] = dict(values_seconds=c.wall, **{m: s[m] for m in ("efficacy_score", "paraphrase_score",
                                                                           "neighborhood_score")})
        log(f"  quality {precision:8s}: " + ", ".join(f"{m[:4]} {100 * s[m]['mean']:.1f} ± {100 * s[m]['ci']:.1f}"
                                                      for m in ("efficacy_score", "paraphrase_score", "neighborhood_score")))
    ref = out[cfg["precisions"][0]]
    for p, r in out.items():
        r["within_float32_intervals"] = all(abs(r[m]["mean"] - ref[m]["mean"]) <= ref[m]["ci"]
                                            for m in ("efficacy_score", "paraphrase_score", "neighborhood_score"))
    return dict(n_records=len(recs), method="emmet", layer=hp.layers[-1], results=out)


def llama7b_config(vocab_size: int, smoke: bool):
    "Llama-2-7B's shape (or a tiny one for --smoke); the vocabulary is the tokenizer's (SmolLM2: 49,152)."
    from transformers import LlamaConfig
    if smoke:
        return LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=vocab_size, max_position_embeddings=512)
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=vocab_size, max_position_embeddings=4096, rms_norm_eps=1e-5)


def llama7b(tok, reqs, wiki, device, cfg: dict, log=print) -> dict:
    """cfg: smoke, batch_sizes (values), steps, stats_tokens, keys_edits, time_budget. A random 7B-shaped model in
    bfloat16 built on the device; statistics at EMMET's and MEMIT's default layers, values at EMMET's."""
    import bench_stats
    from transformers import AutoModelForCausalLM
    conf = llama7b_config(len(tok), cfg["smoke"])
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16).eval().requires_grad_(False)
    build = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    log(f"  7B-shaped model: {n_params / 1e9:.2f} B parameters (bfloat16) built in {build:.1f} s on {device}")
    layer = HParams.for_model(model, "emmet").layers[0]
    out = dict(config=dict(hidden_size=conf.hidden_size, intermediate_size=conf.intermediate_size,
                           num_hidden_layers=conf.num_hidden_layers, vocab_size=conf.vocab_size),
               parameters=n_params, build_seconds=build, layer=layer)
    matmul = matmul_rate(device, torch.bfloat16)
    out["stats"] = bench_stats.run(model, tok, wiki, device, matmul, dict(n_tokens=cfg["stats_tokens"], repeat=1), log)
    tmpl = ContextTemplates.memit(model, tok, seed=0)
    rows, t_start = [], time.perf_counter()
    for B in cfg["batch_sizes"]:
        if time.perf_counter() - t_start > cfg["time_budget"]:
            rows.append(dict(B=B, skipped="time budget")); continue
        with PeakMemory(device) as pm, Clock(device) as c:
            tv = compute_target_values(model, tok, reqs[:B], layer, tmpl, hook="rewrite",
                                       v_num_grad_steps=cfg["steps"], progress=False)
        rows.append(dict(B=B, seconds=c.wall, seconds_per_edit=c.wall / B, steps=cfg["steps"],
                         mean_evals_per_edit=float((tv.n_steps + 1).float().mean()), peak_memory_bytes=pm.bytes))
        log(f"  7B values B={B:5d}: {c.wall / B:.3f} s per edit, peak {pm.bytes / 2**30 if pm.bytes else float('nan'):.1f} GiB")
    out["values"] = rows
    with Clock(device) as c:
        compute_keys(model, tok, reqs[:cfg["keys_edits"]], layer, tmpl)
    out["keys"] = dict(edits=cfg["keys_edits"], seconds=c.wall, seconds_per_edit=c.wall / cfg["keys_edits"])
    del model
    if device.type == "cuda": torch.cuda.empty_cache()
    return out


def sweep(model, tok, records, wiki, device, cfg: dict, log=print) -> dict:
    "cfg: n_records, stats_tokens, methods. One batch of all the records per method, single layer, with evaluation."
    import tempfile
    from unifiededit.corpus import file_corpus
    from unifiededit.stats import collect_key_stats
    from unifiededit.sweep import run_sweep
    from unifiededit.sweep_results import load_sweep
    recs = list(records)[:cfg["n_records"]]
    hp = HParams.for_model(model, "emmet")
    with Clock(device) as cs:
        stats = collect_key_stats(model, tok, hp.layers, file_corpus(wiki), n_tokens=cfg["stats_tokens"], progress=False)
    with tempfile.TemporaryDirectory() as d, Clock(device) as c:
        run = run_sweep(model, tok, recs, f"{d}/out", methods=cfg["methods"], batch_sizes=[len(recs)],
                        layer_modes=["single"], stats=stats, value_cache=f"{d}/values", progress=False, log=log)
        summ = load_sweep(run.out_dir).summary()
    res = dict(n_records=len(recs), seconds_stats=cs.wall, seconds_sweep=c.wall, sweep_seconds=run.seconds,
               methods={r["method"]: {m: r[m] for m in ("efficacy_score", "paraphrase_score", "neighborhood_score",
                                                        "delta_norm", "cond_gram")} for _, r in summ.iterrows()})
    log(f"  sweep of {len(recs)} edits ({', '.join(cfg['methods'])}): {c.wall:.0f} s with evaluation "
        f"(statistics {cs.wall:.0f} s)")
    return res


def print_tables(r: dict, log=print):
    if "values_grid" in r:
        v = r["values_grid"]
        cols = [("B", "B", "d"), ("precision", "precision", "s"), ("seconds", "s", ".1f"), ("edits_per_s", "edits/s", ".2f"),
                ("speedup_batched_vs_serial", "vs reference", ".1f"), ("speedup_vs_matmul_limit", "of matmul rate", ".2f"),
                ("peak_memory_gib", "peak GiB", ".1f")]
        rows = [dict(x, peak_memory_gib=(x["peak_memory_bytes"] or math.nan) / 2**30) for x in v["rows"]]
        log(table(rows, cols, title="\nTarget values at scale (SmolLM2)"))
    if "llama7b" in r:
        cols = [("B", "B", "d"), ("seconds_per_edit", "s/edit", ".3f"), ("mean_evals_per_edit", "evals/edit", ".1f"),
                ("peak_memory_gib", "peak GiB", ".1f")]
        rows = [dict(x, peak_memory_gib=(x.get("peak_memory_bytes") or math.nan) / 2**30) for x in r["llama7b"]["values"]
                if "seconds" in x]
        log(table(rows, cols, title="\nTarget values, Llama-2-7B-shaped model (bfloat16)"))
