"""Key statistics: tokens/s of `KeyStatsCollector` for 1 and 5 layers in one pass, against a bare forward pass
truncated after the last needed layer (the limit) and against one truncated pass per layer (what the reference code
does for multi-layer MEMIT)."""
from __future__ import annotations

import torch

from _common import Clock, ratio, table

from unifiededit.hooks import Trace
from unifiededit.hparams import HParams
from unifiededit.models import ModelAdapter
from unifiededit.corpus import file_corpus, token_batches
from unifiededit.stats import KeyStatsCollector, _block_edges, add_gram_upper


def _truncated_forward(model, adapter, layer: int, batches, device):
    "A bare forward pass stopped right after the rewrite module of `layer` (no keys kept, nothing accumulated)."
    name = adapter.name("rewrite", layer)
    with torch.inference_mode():
        for ids, mask in batches:
            with Trace(model, [name], retain_output=False, stop_after=name):
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)


def _collect(model, adapter, layers, batches, **kw):
    col = KeyStatsCollector(model, layers, adapter=adapter, **kw)
    for ids, mask in batches: col.update(ids, mask)
    return col


def _timed(fn, device, repeat: int) -> tuple[float, float]:
    "Best wall and its CPU seconds over `repeat` runs."
    best = None
    for _ in range(repeat):
        with Clock(device) as c: fn()
        if best is None or c.wall < best[0]: best = (c.wall, c.cpu)
    return best


def run(model, tok, corpus_path, device, matmul: dict, cfg: dict, log=print) -> dict:
    "cfg: n_tokens (per measurement), repeat (best of)."
    adapter = ModelAdapter.from_model(model)
    one = HParams.for_model(model, "emmet").layers                    # [5] for SmolLM2
    five = HParams.for_model(model, "memit").layers                   # [3..7]
    n_tokens, repeat = cfg["n_tokens"], cfg["repeat"]
    batches = list(token_batches(file_corpus(corpus_path), tok, max_length=512, batch_size=8, n_tokens=n_tokens))
    n = sum(int(m.sum()) for _, m in batches)
    log(f"stats: {n:,} tokens of {corpus_path.name} in {len(batches)} batches of 8 x 512; layers {one} and {five}")
    _truncated_forward(model, adapter, five[-1], batches[:1], device)               # warm-up
    cases = []
    for layers in (one, five):
        t_lim, c_lim = _timed(lambda: _truncated_forward(model, adapter, layers[-1], batches, device), device, repeat)
        t_one, c_one = _timed(lambda: _collect(model, adapter, layers, batches), device, repeat)
        t_full, _ = _timed(lambda: _collect(model, adapter, layers, batches, block=1 << 30), device, repeat)
        t_per, c_per = _timed(lambda: [_collect(model, adapter, [l], batches) for l in layers], device,
                              1 if len(layers) > 1 else repeat)
        # the accumulation alone: sum k k^T of every layer on keys already captured (one batch, scaled to all)
        col = KeyStatsCollector(model, layers, adapter=adapter)
        got = col.forward(*batches[0])
        keys = [got[adapter.name("rewrite", l)].reshape(-1, adapter.d_in(l)).float() for l in layers]
        sums = [torch.zeros(k.shape[1], k.shape[1], dtype=torch.float64, device=k.device) for k in keys]
        def acc():
            for k, a in zip(keys, sums): add_gram_upper(a, k, col.block)
        t_acc1, _ = _timed(acc, device, 3)
        t_acc = t_acc1 * len(batches)
        d = adapter.d_in(layers[0])
        e = _block_edges(d, col.block)
        tri = sum(c1 * (c1 - c0) for c0, c1 in zip(e[:-1], e[1:])) / d**2      # the fraction of kᵀk computed
        case = dict(layers=layers, tokens=n, truncated_at=layers[-1],
                    seconds_truncated_forward=t_lim, seconds_one_pass=t_one, seconds_per_layer_passes=t_per,
                    cpu_seconds_truncated_forward=c_lim, cpu_seconds_one_pass=c_one, cpu_seconds_per_layer_passes=c_per,
                    tokens_per_s_truncated_forward=n / t_lim, tokens_per_s_one_pass=n / t_one,
                    tokens_per_s_per_layer_passes=n / t_per,
                    speedup_one_pass_vs_truncated_forward=t_lim / t_one,
                    speedup_one_pass_vs_per_layer_passes=t_per / t_one,
                    seconds_one_pass_full_gram=t_full, tokens_per_s_one_pass_full_gram=n / t_full,
                    speedup_triangle_vs_full_gram=t_full / t_one,
                    seconds_accumulate_only=t_acc,
                    flops_accumulate_per_token=2 * d * d * tri * len(layers), gram_fraction_computed=tri,
                    speedup_one_pass_without_accumulation_vs_truncated_forward=ratio(t_lim, t_one - t_acc))
        cases.append(case)
        log(f"  layers {layers}: limit {case['tokens_per_s_truncated_forward']:.0f} tok/s, one pass "
            f"{case['tokens_per_s_one_pass']:.0f} tok/s ({case['speedup_one_pass_vs_truncated_forward']:.2f} of the limit), "
            f"one pass per layer {case['tokens_per_s_per_layer_passes']:.0f} tok/s")
    # FLOPs of the truncated forward per token (matrix products), to explain the gap
    from torch.utils.flop_counter import FlopCounterMode
    fwd_flops = {}
    for layers in (one, five):
        with FlopCounterMode(display=False) as fc:
            _truncated_forward(model, adapter, layers[-1], batches[:1], device)
        fwd_flops[layers[-1]] = fc.get_total_flops() / int(batches[0][1].sum())
    for case in cases:
        f = fwd_flops[case["truncated_at"]]
        case["flops_forward_per_token"] = f
        case["flops_share_of_accumulation"] = case["flops_accumulate_per_token"] / (f + case["flops_accumulate_per_token"])
        case["speedup_ceiling_one_pass_vs_truncated_forward"] = f / (f + case["flops_accumulate_per_token"])
    return dict(corpus=str(corpus_path.name), batch=[8, 512], matmul=matmul, cases=cases,
                note="speedup_one_pass_vs_truncated_forward is the fraction of the limit reached (goal >= 0.85). "
                     "speedup_ceiling_* = forward FLOPs / (forward + accumulation FLOPs): what it could reach if the "
                     "Gram accumulation ran as fast as the forward's matrix products. Accumulation = the block-upper "
                     "triangle of k^T k (gram_fraction_computed x 2 d_in^2 FLOPs per token and layer, float32) per layer "
                     "per batch; the pass stops at the deepest rewrite module's input, the limit right after that module.")


def print_tables(s: dict, log=print):
    cols = [("layers", "layers", ""), ("tokens_per_s_truncated_forward", "limit tok/s", ".0f"),
            ("tokens_per_s_one_pass", "one pass tok/s", ".0f"), ("speedup_one_pass_vs_truncated_forward", "of limit", ".2f"),
            ("speedup_ceiling_one_pass_vs_truncated_forward", "FLOP ceiling", ".2f"),
            ("tokens_per_s_per_layer_passes", "pass/layer tok/s", ".0f"),
            ("speedup_one_pass_vs_per_layer_passes", "speedup", ".2f"),
            ("tokens_per_s_one_pass_full_gram", "full kᵀk tok/s", ".0f"),
            ("speedup_triangle_vs_full_gram", "triangle speedup", ".2f")]
    rows = [dict(c, layers=",".join(map(str, c["layers"]))) for c in s["cases"]]
    log(table(rows, cols, title=f"\nKey statistics ({s['corpus']}, batches of 8 x 512 tokens)"))
