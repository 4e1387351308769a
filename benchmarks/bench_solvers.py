"""Closed-form solvers: time and peak memory of the EMMET and MEMIT updates of `unifiededit.objective` (both routes:
'primal', a (d_in, d_in) system, and 'dual', an (E, E) system) for E = 1 ... 10,000 edits at d_in = 1,536 (SmolLM2)
and 6,400 (GPT-2 XL), against explicit-inverse baselines written here (how the reference code computes them) and
against one Cholesky factorization of C (the limit: any exact update from scratch needs at least that much work).

Run by `run.py` in a child process (MALLOC_MMAP_THRESHOLD_ set, so that freed blocks go back to the system and the
resident-set high-water mark measures each solve's peak); or alone: `python benchmarks/bench_solvers.py --size quick`."""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from _common import PeakMemory, best_of, matmul_rate, pick_device, ratio, table

from unifiededit.objective import Preservation, emmet_update, memit_update, update_flops

ALPHA = 0.1                       # emmet_lambda of the EMMET reference for batches > 1
D_OUT = {1536: 576, 6400: 1600, 11008: 4096}   # d_out of the rewrite module: SmolLM2-135M, GPT-2 XL, Llama-2-7B


def spd(d: int, device, seed: int = 0) -> torch.Tensor:
    "A (d, d) float64 SPD matrix shaped like a key second moment: G Gᵀ / m + 0.1 I with G (d, d/2) Gaussian."
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(d, d // 2, generator=g).to(device)
    C = (G @ G.T).double() / (d // 2) + 0.1 * torch.eye(d, dtype=torch.float64, device=device)
    return (C + C.T) / 2


def inverse_emmet(C, K, R, alpha):
    "EMMET as the reference code writes it: C⁻¹ and (KᵀC⁻¹K + αI)⁻¹ as explicit inverses."
    Cinv = torch.linalg.inv(C)
    KtCinv = K.T @ Cinv                                                   # (E, d)
    S = KtCinv @ K + alpha * torch.eye(K.shape[1], dtype=K.dtype, device=K.device)
    return (R @ torch.linalg.inv(S)) @ KtCinv


def inverse_memit(C, K, R):
    "MEMIT with an explicit inverse: R Kᵀ (C + K Kᵀ)⁻¹."
    return (R @ K.T) @ torch.linalg.inv(C + K @ K.T)


def measure(fn, device, repeat):
    "Best wall time over `repeat` calls, the result, and the peak memory of one more call."
    t, out = best_of(fn, repeat=repeat, device=device)
    with PeakMemory(device) as pm: fn()
    return t, out, pm.bytes


GRIDS = {"smoke": ([1536], [1, 64]), "quick": ([1536], [1, 16, 128, 512, 2048]),
         "full": ([1536, 6400], [1, 10, 100, 1000, 2000, 5000, 10000]),
         "gpu": ([11008], [1, 1000, 10000])}


def run(device, size: str, log=print) -> dict:
    dims, edits = GRIDS[size]
    mm64 = matmul_rate(device, torch.float64, n=2048, repeat=3)
    log(f"solvers: float64 matmul {mm64['flops_per_s'] / 1e9:.1f} GFLOP/s; d_in {dims}; E {edits}")
    rows = []
    for d in dims:
        m = D_OUT[d]
        C = spd(d, device)
        t_chol, _, mem_chol = measure(lambda: torch.linalg.cholesky(C), device, 3)
        t_fac, P, mem_fac = measure(lambda: Preservation(C), device, 3)
        log(f"  d_in={d}: cholesky(C) {t_chol:.3f} s, Preservation(C) {t_fac:.3f} s")
        for E in edits:
            g = torch.Generator().manual_seed(E)
            K = torch.randn(d, E, generator=g, dtype=torch.float64).to(device)
            R = torch.randn(m, E, generator=g, dtype=torch.float64).to(device)
            fl = update_flops(d, E, m)
            row = dict(d_in=d, d_out=m, E=E, seconds_cholesky=t_chol, seconds_factor=t_fac,
                       peak_bytes_cholesky=mem_chol, peak_bytes_factor=mem_fac,
                       flops_primal=fl["primal"], flops_dual=fl["dual"],
                       auto_route=min(("primal", "dual"), key=fl.__getitem__))
            ref = {}
            for method, fn_inv in (("emmet", lambda: inverse_emmet(C, K, R, ALPHA)), ("memit", lambda: inverse_memit(C, K, R))):
                t_inv, D_inv, mem_inv = measure(fn_inv, device, 1 if E > 2000 or d > 2000 else 2)
                row[f"seconds_{method}_inverse"], row[f"peak_bytes_{method}_inverse"] = t_inv, mem_inv
                for route in ("primal", "dual"):
                    if method == "emmet":
                        f = lambda: emmet_update(P, K, R, emmet_lambda=ALPHA, route=route)
                    else:
                        f = lambda: memit_update(P, K, R, route=route)
                    t, D, mem = measure(f, device, 3 if fl[route] / mm64["flops_per_s"] < 0.3 else 1)
                    key = f"{method}_{route}"
                    row[f"seconds_{key}"], row[f"peak_bytes_{key}"] = t, mem
                    row[f"seconds_{key}_from_C"] = t_fac + t                            # factorization included
                    row[f"speedup_{key}_vs_inverse"] = ratio(t_inv, t_fac + t)          # both start from C
                    row[f"speedup_{key}_solve_vs_inverse"] = ratio(t_inv, t)            # C factored once, reused
                    row[f"speedup_{key}_vs_cholesky_limit"] = ratio(t_chol, t_fac + t)  # 1 = the cost of one Cholesky
                    row[f"flops_per_s_{key}"] = fl[route] / t
                    row[f"speedup_{key}_vs_matmul_limit"] = ratio(fl[route] / t, mm64["flops_per_s"])
                    ref[key] = D
                row[f"max_rel_diff_{method}_routes_vs_inverse"] = max(
                    float((ref[f"{method}_{r}"] - D_inv).norm() / D_inv.norm()) for r in ("primal", "dual"))
                del D_inv
            rows.append(row)
            log(f"  d_in={d} E={E:6d}: emmet primal {row['seconds_emmet_primal']:.3g} s, dual {row['seconds_emmet_dual']:.3g} s, "
                f"inverse {row['seconds_emmet_inverse']:.3g} s | memit primal {row['seconds_memit_primal']:.3g} s, "
                f"dual {row['seconds_memit_dual']:.3g} s, inverse {row['seconds_memit_inverse']:.3g} s")
            del K, R, ref
        del C, P
    return dict(alpha=ALPHA, matmul_float64=mm64, rows=rows,
                note="seconds_<method>_<route>: the update given C's factorization (a Preservation, built once per C: "
                     "seconds_factor); *_from_C adds the factorization. Inverse baselines start from C. "
                     "speedup_*_vs_cholesky_limit = time of one Cholesky of C / time of the update from C (1 = at the limit). "
                     "Peak bytes: above the inputs (CPU: resident-set high-water mark).")


def print_tables(s: dict, log=print):
    mib = lambda b: None if b is None else b / 2**20
    for method in ("emmet", "memit"):
        rows = []
        for r in s["rows"]:
            a = r["auto_route"]
            rows.append(dict(d_in=r["d_in"], E=r["E"], chol=r["seconds_cholesky"], factor=r["seconds_factor"],
                             primal=r[f"seconds_{method}_primal"], dual=r[f"seconds_{method}_dual"],
                             inverse=r[f"seconds_{method}_inverse"], auto=a,
                             vs_inverse=r[f"speedup_{method}_{a}_vs_inverse"],
                             vs_limit=r[f"speedup_{method}_{a}_vs_cholesky_limit"],
                             mem_auto=mib(r[f"peak_bytes_{method}_{a}"]), mem_inv=mib(r[f"peak_bytes_{method}_inverse"]),
                             err=r[f"max_rel_diff_{method}_routes_vs_inverse"]))
        cols = [("d_in", "d_in", "d"), ("E", "E", "d"), ("chol", "chol(C) s", ".3g"), ("factor", "factor s", ".3g"),
                ("primal", "primal s", ".3g"), ("dual", "dual s", ".3g"), ("inverse", "inverse s", ".3g"),
                ("auto", "auto", ""), ("vs_inverse", "speedup vs inv (from C)", ".1f"),
                ("vs_limit", "chol / (factor+auto)", ".2f"), ("mem_auto", "peak MiB auto", ".0f"),
                ("mem_inv", "peak MiB inverse", ".0f"), ("err", "rel diff", ".0e")]
        what = f"alpha = {s['alpha']:g}" if method == "emmet" else "C + K Kᵀ"
        log(table(rows, cols, title=f"\n{method.upper()} update ({what}), float64; primal/dual given C's factor"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(GRIDS), default="quick")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the result here")
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    res = run(pick_device(a.device), a.size, log=lambda *x: print(*x, file=sys.stderr, flush=True))
    res["torch_threads"] = torch.get_num_threads()
    if a.json:
        with open(a.json, "w") as f: json.dump(res, f, indent=1)
    print_tables(res, log=lambda *x: print(*x, file=sys.stderr, flush=True))
