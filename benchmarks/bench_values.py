"""Target values (z / v*): edits per second of the reference loop (one edit at a time, every prompt through the whole
model at every step, logits at every position) against unifiededit's batched suffix path, with identical
hyper-parameters and results; FLOPs per edit of both and the achieved FLOP/s as a fraction of a plain matmul's."""
from __future__ import annotations

import torch

from _common import Clock, ratio, table

from unifiededit.hparams import HParams
from unifiededit.keys import ContextTemplates
from unifiededit.batched_values import compute_target_values
from unifiededit.values import compute_target_values_serial, value_prompts


def count_flops(fn) -> float:
    "Floating-point operations of the matrix products fn() runs (torch.utils.flop_counter), forward and backward."
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc: fn()
    return float(fc.get_total_flops())


def flop_model(run, n_edits: int) -> dict:
    """FLOPs of one edit with n evaluations of the loss (and n - 1 backward passes) = fixed + n · per_eval, fitted
    from two runs of `run(steps)` (2 and 4 evaluations, early stop off) on `n_edits` edits."""
    f2, f4 = count_flops(lambda: run(2)), count_flops(lambda: run(4))
    per_eval = (f4 - f2) / 2 / n_edits
    return dict(per_eval=per_eval, fixed=f2 / n_edits - 2 * per_eval)


def rel_err(a, b) -> float:
    return ((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)).max().item()


def settings(model) -> dict:
    "The hyper-parameters of an EMMET edit of this model (one layer, so the value hook is the rewrite module)."
    hp = HParams.for_model(model, "emmet")
    return dict(layer=hp.layers[-1], hook="rewrite" if len(hp.layers) == 1 else "layer", v_lr=hp.v_lr,
                v_num_grad_steps=hp.v_num_grad_steps, clamp_norm_factor=hp.clamp_norm_factor, kl_factor=hp.kl_factor,
                v_weight_decay=hp.v_weight_decay)


def run(model, tok, reqs, device, matmul: dict, cfg: dict, log=print) -> dict:
    """cfg: batch_sizes, n_b1 (edits run one at a time for B = 1), n_serial (edits through the reference loop),
    steps_by_B (B -> v_num_grad_steps where it differs from the hyper-parameters', e.g. to fit B = 128 in --quick)."""
    hp = settings(model)
    layer, hook = hp.pop("layer"), hp.pop("hook")
    batch_sizes, n_b1, n_serial = cfg["batch_sizes"], cfg["n_b1"], cfg["n_serial"]
    steps_by_B = cfg.get("steps_by_B", {})
    tmpl = ContextTemplates.memit(model, tok, seed=0)
    vps = [value_prompts(tok, r, tmpl) for r in reqs[:max(batch_sizes)]]
    log(f"values: layer {layer}, hook {hook!r}, {len(tmpl)} templates + the KL prompt, {hp['v_num_grad_steps']} steps; "
        f"{sum(sum(map(len, vp.input_ids)) for vp in vps) / len(vps):.1f} tokens per edit")

    serial_fn = lambda rs, **kw: compute_target_values_serial(model, tok, rs, layer, tmpl, hook=hook, **{**hp, **kw})
    fast_fn = lambda rs, **kw: compute_target_values(model, tok, rs, layer, tmpl, hook=hook, progress=False,
                                                     reuse_prefix=True, **{**hp, **kw})
    fast_fn(reqs[:2], v_num_grad_steps=2)                                     # warm-up (allocator, kernels)

    # the reference loop, one edit at a time
    ser = []
    for e in range(n_serial):
        with Clock(device) as c: tv = serial_fn([reqs[e]])
        ser.append(dict(seconds=c.wall, cpu_seconds=c.cpu, evals=int(tv.n_steps[0]) + 1, tv=tv))
        log(f"  serial edit {e}: {c.wall:.2f} s, {int(tv.n_steps[0])} steps")
    s_per_eval = sum(s["seconds"] for s in ser) / sum(s["evals"] for s in ser)

    log("  counting FLOPs (2 edits, 2 and 4 evaluations)")
    fl_serial = flop_model(lambda n: serial_fn(reqs[:2], v_num_grad_steps=n, early_stop_loss=-1.0), 2)
    fl_fast = flop_model(lambda n: fast_fn(reqs[:2], v_num_grad_steps=n, early_stop_loss=-1.0), 2)

    rows = []
    for B in batch_sizes:
        n = n_b1 if B == 1 else B
        steps = steps_by_B.get(B, hp["v_num_grad_steps"])
        with Clock(device) as c: tv = fast_fn(reqs[:n], batch_size=B, v_num_grad_steps=steps)
        evals = (tv.n_steps + 1).tolist()
        # the reference loop's time for the same edits and steps (identical trajectories; see serial_extrapolation)
        overlap = min(n, n_serial) if steps == hp["v_num_grad_steps"] else 0
        measured = sum(s["seconds"] for s in ser[:overlap])
        serial_s = measured + s_per_eval * sum(evals[overlap:])
        errs = [rel_err(tv.delta[e:e + 1], ser[e]["tv"].delta) for e in range(overlap)]
        same_steps = all(int(tv.n_steps[e]) == int(ser[e]["tv"].n_steps[0]) for e in range(overlap))
        fl_s = sum(fl_serial["fixed"] + k * fl_serial["per_eval"] for k in evals) / n
        fl_f = sum(fl_fast["fixed"] + k * fl_fast["per_eval"] for k in evals) / n
        row = dict(B=B, edits=n, v_num_grad_steps=steps, seconds=c.wall, cpu_seconds=c.cpu, edits_per_s=n / c.wall,
                   serial_seconds=serial_s, serial_edits_per_s=n / serial_s,
                   serial_measured_edits=overlap, serial_extrapolated_edits=n - overlap,
                   speedup_batched_vs_serial=serial_s / c.wall,
                   mean_evals_per_edit=sum(evals) / n,
                   flops_per_edit_serial=fl_s, flops_per_edit_batched=fl_f,
                   speedup_flops_serial_over_batched=fl_s / fl_f,
                   flops_per_s_serial=fl_s * n / serial_s, flops_per_s_batched=fl_f * n / c.wall,
                   speedup_serial_vs_matmul_limit=ratio(fl_s * n / serial_s, matmul["flops_per_s"]),
                   speedup_batched_vs_matmul_limit=ratio(fl_f * n / c.wall, matmul["flops_per_s"]),
                   max_rel_err_delta_vs_serial=max(errs) if errs else None, n_steps_equal_serial=same_steps)
        rows.append(row)
        log(f"  B={B:4d} ({steps} steps): {n} edits in {c.wall:.1f} s = {row['edits_per_s']:.3f} edits/s; serial {row['serial_edits_per_s']:.3f} "
            f"edits/s -> x{row['speedup_batched_vs_serial']:.1f}")
    out = dict(model=getattr(model.config, "_name_or_path", type(model).__name__), layer=layer, hook=hook,
               n_templates=len(tmpl), rows_per_edit=len(tmpl) + 1,
               tokens_per_edit=sum(sum(map(len, vp.input_ids)) for vp in vps) / len(vps),
               suffix_tokens_per_edit=sum(sum(len(x) - s for x, s in zip(vp.input_ids[:-1], vp.subject_pos)) + 1
                                          for vp in vps) / len(vps),
               hparams=hp, matmul=matmul,
               serial=dict(edits=n_serial, seconds=[s["seconds"] for s in ser], cpu_seconds=[s["cpu_seconds"] for s in ser],
                           evals=[s["evals"] for s in ser], seconds_per_eval=s_per_eval,
                           seconds_per_edit=sum(s["seconds"] for s in ser) / n_serial),
               flops_model=dict(serial=fl_serial, batched=fl_fast,
                                note="FLOPs of one edit with n loss evaluations = fixed + n * per_eval (matrix products "
                                     "counted by torch.utils.flop_counter, forward and backward; the CPU attention "
                                     "kernel is not counted: <1% here)"),
               serial_extrapolation="the reference loop is timed edit by edit on the first serial_measured_edits edits; "
                                    "for the other edits its time is seconds_per_eval x their number of loss evaluations "
                                    "(both paths take the same steps: n_steps_equal_serial)",
               rows=rows)
    return out


def before_after(model, tok, reqs, device, cfg: dict, log=print) -> dict:
    """The slowest phase (values), before (the batched full-sequence path: every row through every block at every
    step) and after (the suffix path) on the same edits, plus where the time goes now (torch.profiler).
    cfg: B (the edits, one batch), steps (v_num_grad_steps of both runs)."""
    hp = settings(model)
    layer, hook = hp.pop("layer"), hp.pop("hook")
    hp["v_num_grad_steps"] = cfg.get("steps", hp["v_num_grad_steps"])
    tmpl = ContextTemplates.memit(model, tok, seed=0)
    B = cfg["B"]
    go = lambda reuse, **kw: compute_target_values(model, tok, reqs[:B], layer, tmpl, hook=hook, batch_size=B,
                                                   progress=False, reuse_prefix=reuse, **{**hp, **kw})
    with Clock(device) as c: before = go(False)
    with Clock(device) as c2: after = go(True)
    log(f"  before (full sequences, B={B}): {c.wall:.1f} s; after (suffix only): {c2.wall:.1f} s")
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        go(True, v_num_grad_steps=6)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ev = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in ev)
    top = [dict(op=e.key, self_seconds=getattr(e, key) / 1e6, share=getattr(e, key) / total, calls=e.count)
           for e in ev[:8]]
    return dict(phase="values", edits=B, v_num_grad_steps=hp["v_num_grad_steps"], seconds_before=c.wall,
                seconds_after=c2.wall, cpu_seconds_before=c.cpu, cpu_seconds_after=c2.cpu,
                speedup_after_vs_before=c.wall / c2.wall,
                before="batched, every row of every active edit through the whole model at every step (logits only "
                       "where the loss reads them) -- the path before this change, reuse_prefix=False",
                after="positions before the subject's last token and the blocks below the hook computed once; each "
                      "step runs only the suffixes through the blocks above, in buckets of equal length (reuse_prefix=True)",
                n_steps_equal=bool(torch.equal(before.n_steps, after.n_steps)),
                max_rel_err_delta=rel_err(after.delta, before.delta),
                profile_after_top_ops=top, profile_steps=6)


def print_tables(v: dict, log=print):
    cols = [("B", "B", "d"), ("edits", "edits", "d"), ("serial_edits_per_s", "serial edits/s", ".3f"),
            ("edits_per_s", "batched edits/s", ".3f"), ("speedup_batched_vs_serial", "speedup", ".1f"),
            ("flops_per_edit_serial", "GFLOP/edit serial", ".4g"), ("flops_per_edit_batched", "GFLOP/edit batched", ".4g"),
            ("speedup_serial_vs_matmul_limit", "serial/matmul", ".2f"),
            ("speedup_batched_vs_matmul_limit", "batched/matmul", ".2f"), ("max_rel_err_delta_vs_serial", "max rel err", ".1e")]
    rows = [dict(r, flops_per_edit_serial=r["flops_per_edit_serial"] / 1e9,
                 flops_per_edit_batched=r["flops_per_edit_batched"] / 1e9) for r in v["rows"]]
    log(table(rows, cols, title=f"\nTarget values, {v['model']} layer {v['layer']} ({v['hook']} hook), "
                                f"{v['hparams']['v_num_grad_steps']} steps, matmul limit "
                                f"{v['matmul']['flops_per_s'] / 1e9:.0f} GFLOP/s"))
