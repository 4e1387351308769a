"""Tests for unifiededit.values and unifiededit.batched_values: target tokens, the value loss, batched vs serial."""
import pytest
import torch

from unifiededit.keys import ContextTemplates
from unifiededit.requests import EditRequest, fill
from unifiededit.models import ModelAdapter
from unifiededit.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer
from unifiededit.batched_values import compute_target_values, prefix_reuse_unsupported
from unifiededit.values import TargetValues, compute_target_values_serial, target_token_ids, value_prompts

# initializer_range 0.1: a random model at the usual 0.02 can barely be steered (its logits stay near uniform)
SETUPS = {"bpe": ("gpt2", "bpe"), "sentencepiece": ("llama", "sentencepiece")}
REQS = [EditRequest("{} plays the sport of", "LeBron James", "football"),
        EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
        EditRequest("{}, which is located in", "Autonomous University of Madrid", "Sweden"),
        EditRequest("{} was created by", "Apple A5", "Google")]
TEMPLATES = ContextTemplates([["{}"], ["Because the city. {}", "I like it. {}"]])
FAST = dict(v_num_grad_steps=8, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def setup(kind, **cfg):
    family, tk = SETUPS[kind]
    return tiny_model(family, initializer_range=0.1, **cfg), tiny_tokenizer(tk)


def rel_err(a, b):
    return ((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)).max().item()


# ---------------------------------------------------------------- tokenization of the loss
@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_target_tokens(kind):
    tok = tiny_tokenizer(kind)
    for r in REQS:
        ids = target_token_ids(tok, r)
        assert tok.decode(ids).strip() == r.target_new
        assert tok.bos_token_id not in ids or tok.bos_token_id == tok.eos_token_id
        # exactly the tokens the target gets after the prompt in one tokenization of the whole text
        whole = tok(r.text + " " + r.target_new)["input_ids"]
        assert whole[-len(ids):] == ids
    # a leading space in the target is not doubled
    assert target_token_ids(tok, EditRequest("{} is", "X", " Rome")) == target_token_ids(tok, EditRequest("{} is", "X", "Rome"))


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_value_prompts_layout(kind):
    tok = tiny_tokenizer(kind)
    r = REQS[1]
    vp = value_prompts(tok, r, TEMPLATES)
    assert vp.n_rewrite == len(TEMPLATES) and len(vp.input_ids) == len(TEMPLATES) + 1
    T = len(vp.target_ids)
    for t, row, tp, sp in zip(TEMPLATES.flat, vp.input_ids, vp.target_pos, vp.subject_pos):
        prompt_ids = tok(fill(r, t)[0])["input_ids"]
        assert row == prompt_ids + vp.target_ids[:-1]                    # teacher forcing
        assert tp == list(range(len(prompt_ids) - 1, len(prompt_ids) - 1 + T))
        assert tok.decode(row[: sp + 1], skip_special_tokens=True).endswith(r.subject)
    kl_text = tok.decode(vp.input_ids[-1], skip_special_tokens=True)
    assert kl_text.strip() == f"{r.subject} is a"
    assert tok.decode(vp.input_ids[-1][: vp.subject_pos[-1] + 1], skip_special_tokens=True).strip() == r.subject


# ---------------------------------------------------------------- batched == serial
@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_batched_equals_serial(kind):
    model, tok = setup(kind)
    ser = compute_target_values_serial(model, tok, REQS, 1, TEMPLATES, v_num_grad_steps=8)
    bat = compute_target_values(model, tok, REQS, 1, TEMPLATES, batch_size=3, **FAST)   # chunks of 3 + 1
    assert torch.equal(bat.n_steps, ser.n_steps) and bat.n_steps.tolist() == [7] * 4
    assert rel_err(bat.delta, ser.delta) < 1e-4
    torch.testing.assert_close(bat.h, ser.h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bat.loss_init, ser.loss_init, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bat.loss_final, ser.loss_final, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bat.kl_final, ser.kl_final, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(bat.prob_final, ser.prob_final, rtol=1e-4, atol=1e-7)
    assert torch.allclose(bat.loss_history, ser.loss_history, rtol=1e-4, atol=1e-5, equal_nan=True)


def early_stop_threshold(model, tok, steps=20):
    """A threshold that half of REQS cross before the last evaluation and half never do, read off a run without
    early stop — so the early-stop tests exercise both cases whatever random weights this transformers makes."""
    probe = compute_target_values_serial(model, tok, REQS, 1, TEMPLATES, v_num_grad_steps=steps, early_stop_loss=-1.0)
    mins = sorted(probe.loss_history[:steps - 1].min(0).values.tolist())     # over evaluations followed by a step
    return (mins[1] + mins[2]) / 2


def test_per_edit_early_stop_matches_serial():
    model, tok = setup("bpe")
    thr = early_stop_threshold(model, tok)
    kw = dict(v_num_grad_steps=20, early_stop_loss=thr)
    ser = compute_target_values_serial(model, tok, REQS, 1, TEMPLATES, **kw)
    bat = compute_target_values(model, tok, REQS, 1, TEMPLATES, progress=False, **kw)
    steps = bat.n_steps.tolist()
    assert sorted(steps)[1] < 19 == sorted(steps)[2], steps        # two edits stopped early, two ran to the end
    assert torch.equal(bat.n_steps, ser.n_steps)
    assert rel_err(bat.delta, ser.delta) < 1e-4
    stopped = bat.n_steps < 19
    assert (bat.loss_final[stopped] < thr).all() and (bat.loss_history[:19, ~stopped] >= thr).all()
    # history: nan after stopping
    for e, n in enumerate(steps):
        assert torch.isfinite(bat.loss_history[: n + 1, e]).all() and torch.isnan(bat.loss_history[n + 1:, e]).all()


def test_rewrite_hook_gemma3_matches_serial():
    model, tok = tiny_model("gemma3", initializer_range=0.1), tiny_tokenizer("sentencepiece")
    ser = compute_target_values_serial(model, tok, REQS[:2], 1, TEMPLATES, hook="rewrite", v_num_grad_steps=6)
    bat = compute_target_values(model, tok, REQS[:2], 1, TEMPLATES, hook="rewrite", v_num_grad_steps=6, progress=False)
    assert rel_err(bat.delta, ser.delta) < 1e-4 and torch.equal(bat.n_steps, ser.n_steps)
    ad = ModelAdapter.from_model(model)
    assert bat.h.shape == (2, ad.d_out(1))


# ---------------------------------------------------------------- what the values do
def test_h_is_the_hooked_activation_and_delta_raises_target_probability():
    model, tok = setup("sentencepiece")
    ad, layer = ModelAdapter.from_model(model), 1
    tv = compute_target_values(model, tok, REQS[:2], layer, TEMPLATES, v_num_grad_steps=12, progress=False)
    module = ad.module("layer", layer)
    for e, r in enumerate(REQS[:2]):
        vp = value_prompts(tok, r, ["{}"])
        ids = torch.tensor([vp.input_ids[0][: vp.target_pos[0][0] + 1]])          # the bare prompt
        pos = vp.subject_pos[0]
        seen = {}

        def hook(m, args, out, add=None):
            x = out[0] if isinstance(out, tuple) else out
            seen["h"] = x[0, pos].detach().clone()
            if add is not None:
                x = x.clone(); x[0, pos] += add
                return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x

        def p_target(add=None):
            handle = module.register_forward_hook(lambda m, a, o: hook(m, a, o, add))
            try:
                with torch.no_grad():
                    logits = model(ids).logits[0, -1]
            finally:
                handle.remove()
            return torch.softmax(logits, -1)[vp.target_ids[0]].item()

        p0 = p_target()
        torch.testing.assert_close(tv.h[e], seen["h"], rtol=1e-5, atol=1e-6)      # h: clean activation at bare prompt
        p1 = p_target(tv.delta[e])
        assert p1 > p0
    assert (tv.loss_final < tv.loss_init).all() and (tv.prob_final > tv.prob_init).all()
    torch.testing.assert_close(tv.z, tv.h + tv.delta)


def test_clamp_holds():
    model, tok = setup("bpe")
    c = 0.05
    tv = compute_target_values(model, tok, REQS, 1, TEMPLATES, clamp_norm_factor=c, **FAST)
    ratio = tv.delta.norm(dim=1) / (c * tv.h.norm(dim=1))
    assert (ratio <= 1 + 1e-5).all()
    assert (ratio > 1 - 1e-4).any()                                   # the projection was active
    ser = compute_target_values_serial(model, tok, REQS[:1], 1, TEMPLATES, clamp_norm_factor=c, v_num_grad_steps=8)
    assert rel_err(tv.delta[:1], ser.delta) < 1e-4


def test_model_untouched_and_deterministic():
    model, tok = setup("bpe")
    model.train()
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(True)           # a user's training state
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    a = compute_target_values(model, tok, REQS, 1, TEMPLATES, **FAST)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # bit-identical
    assert [p.requires_grad for p in model.parameters()] == flags and model.training
    assert all(p.grad is None for p in model.parameters())
    b = compute_target_values(model, tok, REQS, 1, TEMPLATES, **FAST)
    assert torch.equal(a.delta, b.delta) and torch.equal(a.h, b.h)
    assert torch.equal(a.loss_history.nan_to_num(-1.0), b.loss_history.nan_to_num(-1.0))
    c = compute_target_values(model, tok, REQS, 1, TEMPLATES, batch_size=1, **FAST)
    assert rel_err(c.delta, a.delta) < 1e-4 and torch.equal(c.n_steps, a.n_steps)


def test_non_finite_is_refused_with_the_request():
    model, tok = setup("bpe")
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite loss.*LeBron James plays the sport of"):
        compute_target_values(model, tok, REQS[:1], 1, TEMPLATES, **FAST)
    with pytest.raises(ValueError, match="non-finite loss.*LeBron James"):
        compute_target_values_serial(model, tok, REQS[:1], 1, TEMPLATES, v_num_grad_steps=3)


def test_argument_errors():
    model, tok = setup("bpe")
    for kw, match in [(dict(hook="mlp"), "hook must be"), (dict(v_num_grad_steps=0), ">= 1"),
                      (dict(v_lr=0.0), "v_lr must be > 0"), (dict(kl_factor=-1.0), "kl_factor must be >= 0"),
                      (dict(batch_size=0), "batch_size must be >= 1")]:
        with pytest.raises(ValueError, match=match):
            compute_target_values(model, tok, REQS, 1, TEMPLATES, progress=False, **kw)
    with pytest.raises(ValueError, match="no edit requests"):
        compute_target_values(model, tok, [], 1, TEMPLATES, progress=False)
    tv = compute_target_values(model, tok, [REQS[0].to_dict()], 1, None, v_num_grad_steps=2, progress=False)
    assert isinstance(tv, TargetValues) and len(tv) == 1 and tv.requests == [REQS[0]]


def test_stop_before_any_step():
    model, tok = setup("sentencepiece")
    tv = compute_target_values(model, tok, REQS[:2], 1, TEMPLATES, early_stop_loss=100.0, **FAST)
    assert tv.n_steps.tolist() == [0, 0] and torch.count_nonzero(tv.delta) == 0
    torch.testing.assert_close(tv.loss_final, tv.loss_init)
    assert torch.isnan(tv.loss_history[1:]).all()


def test_auto_chunks_sorted_by_length_keep_request_order():
    model, tok = setup("bpe")
    one = compute_target_values(model, tok, REQS, 1, TEMPLATES, batch_size=len(REQS), **FAST)
    # a token budget that forces chunks of one edit each, processed shortest first
    auto = compute_target_values(model, tok, REQS, 1, TEMPLATES, max_tokens=1, **FAST)
    assert rel_err(auto.delta, one.delta) < 1e-4 and torch.equal(auto.n_steps, one.n_steps)
    torch.testing.assert_close(auto.loss_init, one.loss_init, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(auto.h, one.h, rtol=1e-5, atol=1e-6)
    assert auto.loss_history.shape == (8, len(REQS))


# ---------------------------------------------------------------- the suffix path (prefix and lower blocks computed once)
@pytest.mark.parametrize("family,kind,hook,layer", [("gpt2", "bpe", "layer", 1), ("gpt2", "bpe", "rewrite", 0),
                                                    ("llama", "sentencepiece", "rewrite", 2),
                                                    ("gemma3", "sentencepiece", "layer", 0),
                                                    ("gptj", "bpe", "layer", 2), ("gpt_neox", "bpe", "rewrite", 1)])
@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_both_paths_equal_serial(family, kind, hook, layer, reuse_prefix):
    model, tok = tiny_model(family, initializer_range=0.1), tiny_tokenizer(kind)
    ser = compute_target_values_serial(model, tok, REQS, layer, TEMPLATES, hook=hook, v_num_grad_steps=6)
    got = compute_target_values(model, tok, REQS, layer, TEMPLATES, hook=hook, v_num_grad_steps=6, batch_size=3,
                                progress=False, reuse_prefix=reuse_prefix)
    assert torch.equal(got.n_steps, ser.n_steps)
    assert rel_err(got.delta, ser.delta) < 1e-4
    torch.testing.assert_close(got.h, ser.h, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.loss_history, ser.loss_history, rtol=1e-4, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(got.kl_final, ser.kl_final, rtol=1e-3, atol=1e-6)


def test_suffix_path_sliding_window_shorter_than_prompts():
    # a window of 5 tokens: cache distances must equal true distances for the result to match
    model, tok = tiny_model("gemma3", initializer_range=0.1, sliding_window=5), tiny_tokenizer("sentencepiece")
    ser = compute_target_values_serial(model, tok, REQS, 1, TEMPLATES, v_num_grad_steps=6)
    got = compute_target_values(model, tok, REQS, 1, TEMPLATES, v_num_grad_steps=6, progress=False, reuse_prefix=True)
    assert torch.equal(got.n_steps, ser.n_steps) and rel_err(got.delta, ser.delta) < 1e-4


def test_suffix_path_small_setup_groups_and_early_stop():
    model, tok = setup("bpe")
    kw = dict(v_num_grad_steps=20, early_stop_loss=early_stop_threshold(model, tok))
    ser = compute_target_values_serial(model, tok, REQS, 1, TEMPLATES, **kw)
    got = compute_target_values(model, tok, REQS, 1, TEMPLATES, progress=False, max_tokens=20, reuse_prefix=True, **kw)
    assert min(ser.n_steps.tolist()) < 19 and torch.equal(got.n_steps, ser.n_steps)
    assert rel_err(got.delta, ser.delta) < 1e-4


def test_suffix_path_restores_blocks_and_model():
    model, tok = setup("sentencepiece")
    blocks = list(model.model.layers)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compute_target_values(model, tok, REQS[:2], 2, TEMPLATES, progress=False, reuse_prefix=True, **{"v_num_grad_steps": 3})
    assert all(a is b for a, b in zip(model.model.layers, blocks))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite loss"):
        compute_target_values(model, tok, REQS[:1], 2, TEMPLATES, progress=False, reuse_prefix=True, v_num_grad_steps=3)
    assert all(a is b for a, b in zip(model.model.layers, blocks))             # stand-ins removed after an error too


def test_suffix_path_runs_fewer_flops():
    from torch.utils.flop_counter import FlopCounterMode
    model, tok = setup("sentencepiece")
    flops = {}
    for reuse in (False, True):
        with FlopCounterMode(display=False) as fc:
            compute_target_values(model, tok, REQS, 1, TEMPLATES, v_num_grad_steps=8, early_stop_loss=-1.0,
                                  progress=False, reuse_prefix=reuse)
        flops[reuse] = fc.get_total_flops()
    assert flops[True] < flops[False] / 2, flops


def test_reuse_prefix_needs_a_cache_aware_decoder(monkeypatch):
    import unifiededit.batched_values as V
    monkeypatch.setattr(V, "_WARNED", set())
    model, tok = setup("bpe")
    base = model.base_model
    base.forward = lambda input_ids=None, attention_mask=None: type(base).forward(base, input_ids=input_ids,
                                                                                 attention_mask=attention_mask)
    with pytest.raises(ValueError, match="suffix-only path cannot run .* takes no KV cache"):
        compute_target_values(model, tok, REQS[:1], 1, TEMPLATES, progress=False, reuse_prefix=True, v_num_grad_steps=2)
    # the default falls back to the full-sequence path, and says so once, with the reason and the cost
    with pytest.warns(RuntimeWarning, match="takes no KV cache.*6x the work"):
        tv = compute_target_values(model, tok, REQS[:1], 1, TEMPLATES, progress=False, v_num_grad_steps=2)
    assert len(tv) == 1 and torch.isfinite(tv.delta).all() and tv.path == "full"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # second time: silent
        compute_target_values(model, tok, REQS[:1], 1, TEMPLATES, progress=False, v_num_grad_steps=2)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_fast_path_is_taken_on_this_transformers_version(family):
    "The default must take the suffix path on every family, whatever transformers release is installed."
    import transformers
    model, tok = tiny_model(family, initializer_range=0.1), tiny_tokenizer(TINY_FAMILIES[family])
    assert prefix_reuse_unsupported(model) is None, (transformers.__version__, prefix_reuse_unsupported(model))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        tv = compute_target_values(model, tok, REQS[:2], 1, TEMPLATES, progress=False, v_num_grad_steps=2)
    assert tv.path == "suffix", transformers.__version__


# ---------------------------------------------------------------- the GPU-shaped variants, checked on the CPU
@pytest.mark.parametrize("reuse", [False, True])
def test_padded_groups_and_sparse_syncs_give_the_same_trajectories(reuse):
    """What a GPU runs by default — one padded group per step, the host reading the state every 4 evaluations (stopped
    edits computed and masked in between) — follows the reference trajectories exactly, early stops included."""
    model, tok = setup("bpe")
    kw = dict(v_num_grad_steps=20, early_stop_loss=early_stop_threshold(model, tok))
    ser = compute_target_values_serial(model, tok, REQS, 1, TEMPLATES, **kw)
    got = compute_target_values(model, tok, REQS, 1, TEMPLATES, progress=False, reuse_prefix=reuse,
                                grouping="padded", sync_every=4, **kw)
    assert torch.equal(got.n_steps, ser.n_steps) and sorted(got.n_steps.tolist())[1] < 19
    assert rel_err(got.delta, ser.delta) < 1e-4
    assert torch.allclose(got.loss_history, ser.loss_history, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_precision_options():
    "'tf32' only changes CUDA float32 products (on a CPU: identical); 'bfloat16' autocasts and still optimizes."
    model, tok = setup("sentencepiece")
    f32 = compute_target_values(model, tok, REQS[:2], 1, TEMPLATES, **FAST)
    tf32 = compute_target_values(model, tok, REQS[:2], 1, TEMPLATES, precision="tf32", **FAST)
    assert torch.equal(f32.delta, tf32.delta)
    bf16 = compute_target_values(model, tok, REQS[:2], 1, TEMPLATES, precision="bfloat16", **FAST)
    assert bf16.delta.dtype == torch.float32 and (bf16.loss_final < bf16.loss_init).all()
    assert not torch.equal(bf16.delta, f32.delta)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        compute_target_values(model, tok, REQS[:1], 1, TEMPLATES, precision="fp8", **FAST)


def test_chunk_sizes():
    "On a CPU chunks hold ~max_tokens padded tokens; the memory estimate behind GPU chunks favours the suffix path."
    from unifiededit.batched_values import _auto_batch_size, _value_bytes_per_edit
    from unifiededit.values import value_prompts
    model, tok = setup("sentencepiece")
    prompts = [value_prompts(tok, r, TEMPLATES) for r in REQS]
    longest = max(len(vp.input_ids) * max(map(len, vp.input_ids)) for vp in prompts)
    assert _auto_batch_size(model, prompts, 4, True, "float32", 10 * longest, torch.device("cpu")) == 10
    full, suffix = (_value_bytes_per_edit(model, prompts, n, s, "float32") for n, s in ((4, False), (2, True)))
    assert 0 < suffix < full
    assert _value_bytes_per_edit(model, prompts, 4, False, "bfloat16") < full


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_values_on_cuda_follow_the_reference(kind):
    "On a GPU the defaults change (padded groups, 4 evaluations between host reads, fused Adam): same trajectories."
    model, tok = setup(kind)
    model.to("cuda")
    kw = dict(v_num_grad_steps=20, early_stop_loss=early_stop_threshold(model, tok))
    ser = compute_target_values_serial(model, tok, REQS, 1, TEMPLATES, **kw)
    got = compute_target_values(model, tok, REQS, 1, TEMPLATES, progress=False, **kw)
    assert got.path == "suffix" and got.delta.device.type == "cuda"
    assert torch.equal(got.n_steps.cpu(), ser.n_steps.cpu()) and rel_err(got.delta, ser.delta) < 1e-3
    for precision in ("tf32", "bfloat16"):
        fast = compute_target_values(model, tok, REQS, 1, TEMPLATES, progress=False, precision=precision, **kw)
        assert torch.isfinite(fast.delta).all() and (fast.loss_final <= fast.loss_init).all()


@pytest.mark.parametrize("sign", [-1, 1])
def test_most_probable_early_stopping_matches_serial(sign):
    "ENCORE's MPES (prob_cutoff < 0: k evaluations with every target top-1; > 0: a mean probability) stops early."
    model, tok = setup("bpe")
    if sign < 0: cutoff = -2
    else:                                            # a probability these edits cross part-way (any random weights)
        probe = compute_target_values_serial(model, tok, REQS, 1, TEMPLATES, v_num_grad_steps=20, early_stop_loss=-1.0)
        cutoff = float(((probe.prob_init + probe.prob_final) / 2).min())
    kw = dict(v_num_grad_steps=20, early_stop_loss=-1.0, prob_cutoff=cutoff)
    ser = compute_target_values_serial(model, tok, REQS, 1, TEMPLATES, **kw)
    for reuse in (False, True):
        got = compute_target_values(model, tok, REQS, 1, TEMPLATES, progress=False, reuse_prefix=reuse, **kw)
        assert torch.equal(got.n_steps, ser.n_steps) and rel_err(got.delta, ser.delta) < 1e-4
    if cutoff > 0:                                                       # it stopped some edits, once above p
        assert (ser.n_steps < 19).any() and (ser.prob_final[ser.n_steps < 19] > cutoff).all()
    from unifiededit.values import _mpes_stop                            # the negative rule: counted evaluations
    assert _mpes_stop(-3, torch.tensor([2, 3, 4]), torch.zeros(3)).tolist() == [False, True, True]
    assert not _mpes_stop(None, 5, 0.99) and _mpes_stop(0.5, 0, 0.6)
