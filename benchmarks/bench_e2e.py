"""End to end: seconds per edit of one EMMET batch on SmolLM2 (`unifiededit.edit`), with the phase breakdown:
statistics (once), context templates, target values, keys, closed-form solve, weight write."""
from __future__ import annotations

from _common import Clock, table

from unifiededit.editing import edit
from unifiededit.hparams import HParams
from unifiededit.corpus import file_corpus
from unifiededit.stats import collect_key_stats

PHASES = ("stats", "templates", "values", "keys", "solve", "write")


def run(model, tok, reqs, corpus_path, device, cfg: dict, log=print) -> dict:
    "cfg: edits (the batch), stats_tokens (None: the hyper-parameters' mom2_n_tokens)."
    E = cfg["edits"]
    hp = HParams.for_model(model, "emmet")
    n_tokens = cfg.get("stats_tokens") or hp.mom2_n_tokens
    log(f"end to end: EMMET, {E} edits, layer {hp.layers}, statistics from {n_tokens:,} tokens of {corpus_path.name}")
    with Clock(device) as c:
        stats = collect_key_stats(model, tok, hp.layers, file_corpus(corpus_path), n_tokens=n_tokens,
                                  max_length=hp.mom2_max_length, progress=False)
    t_stats = c.wall
    with Clock(device) as c:
        e = edit(model, tok, reqs[:E], "emmet", hparams=hp, stats=stats, progress=False)
    t_edit = c.wall
    times = dict(e.diagnostics["times"])
    e.revert()
    times["stats"] = t_stats
    phases = {p: times.get(p, 0.0) for p in PHASES}
    slowest = max((p for p in PHASES if p != "stats"), key=phases.get)
    rows = [dict(phase=p, seconds=phases[p], seconds_per_edit=phases[p] / E, share=phases[p] / (t_edit + t_stats))
            for p in PHASES]
    out = dict(method="emmet", edits=E, layers=hp.layers, value_hook=e.diagnostics.get("value_hook"),
               stats_tokens=n_tokens, phases=rows, seconds_edit_call=t_edit, seconds_total=t_edit + t_stats,
               seconds_per_edit=t_edit / E, seconds_per_edit_with_stats=(t_edit + t_stats) / E,
               slowest_phase=slowest, z_steps_mean=sum(e.diagnostics["z_steps"]) / E,
               note=("statistics are computed once for the batch (their seconds_per_edit amortizes them over this "
                     "batch); 'templates' = generating the context templates; the edit's other phases are timed "
                     "inside unifiededit.edit" + (f"; {cfg['label']}" if cfg.get("label") else "")))
    log(f"  {E} edits: {t_edit:.1f} s in edit() + {t_stats:.1f} s statistics; slowest phase: {slowest} "
        f"({phases[slowest]:.1f} s)")
    return out


def print_tables(r: dict, log=print):
    cols = [("phase", "phase", ""), ("seconds", "seconds", ".2f"), ("seconds_per_edit", "s / edit", ".3f"),
            ("share", "share", ".2f")]
    rows = r["phases"] + [dict(phase="total", seconds=r["seconds_total"],
                               seconds_per_edit=r["seconds_per_edit_with_stats"], share=1.0)]
    log(table(rows, cols, title=f"\nEnd to end: EMMET, {r['edits']} edits, layers {r['layers']}"))
