"""Tests for unifiededit.keys: edit requests, subject positions, context templates, keys."""
import pytest
import torch

from unifiededit.keys import ContextTemplates, compute_keys, subject_activations, template_weights
from unifiededit.requests import EditRequest, encode_with_subject, fill, pad_right, subject_last_token
from unifiededit.models import ModelAdapter
from unifiededit.tiny import tiny_model, tiny_tokenizer

KINDS = ["bpe", "sentencepiece"]
FAMILY = {"bpe": "gpt2", "sentencepiece": "llama"}


pytestmark = pytest.mark.usefixtures("one_thread")


def oracle_last_token(tok, text: str, end: int) -> int:
    """Independent rule: the first n such that the decoded text of tokens[:n+1] reaches the subject's end character.
    Valid for ASCII text, which both tiny tokenizers decode losslessly."""
    ids = tok(text)["input_ids"]
    for n in range(len(ids)):
        if len(tok.decode(ids[: n + 1], skip_special_tokens=True)) >= end:
            return n
    raise AssertionError("subject end not reached")


# ---------------------------------------------------------------- requests
@pytest.mark.parametrize("args, match", [
    (("LeBron James plays", "LeBron James", "football"), "replace it with"),
    (("{} and {} play", "LeBron James", "football"), "found 2"),
    (("{} plays", "", "football"), "subject is empty"),
    (("{} plays", "  \n", "football"), "subject is empty"),
    (("{} plays", "LeBron James", ""), "target_new is empty"),
    (("{} plays", "LeBron James", "   "), "target_new is empty"),
])
def test_request_validation(args, match):
    with pytest.raises(ValueError, match=match):
        EditRequest(*args)


def test_request_types():
    with pytest.raises(TypeError, match="must be a str"):
        EditRequest("{} plays", "X", 5)
    with pytest.raises(TypeError, match="cannot make an EditRequest"):
        EditRequest.from_any(["{} plays", "X", "y"])


def test_from_any_forms():
    rw = {"prompt": "{} plays the sport of", "subject": "LeBron James",
          "target_new": {"str": "football", "id": "Q1"}, "target_true": {"str": "basketball", "id": "Q2"}}
    expected = EditRequest("{} plays the sport of", "LeBron James", "football", "basketball")
    assert EditRequest.from_any(rw) == expected
    assert EditRequest.from_any({**rw, "target_new": "football", "target_true": "basketball"}) == expected
    full = EditRequest.from_any({"case_id": 3, "requested_rewrite": rw, "paraphrase_prompts": []})
    assert full.case_id == 3 and full.target_new == "football"
    assert EditRequest.from_any(full) is full
    assert EditRequest.from_any(full.to_dict()) == full
    with pytest.raises(ValueError, match="lacks"):
        EditRequest.from_any({"prompt": "{} x", "subject": "a"})
    with pytest.raises(ValueError, match="no 'str' key"):
        EditRequest.from_any({**rw, "target_new": {"id": "Q1"}})


def test_fill_spans():
    r = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
    text, (s, e) = fill(r, "Because of it. {}")
    assert text == "Because of it. The mother tongue of Danielle Darrieux is"
    assert text[s:e] == "Danielle Darrieux"
    # braces elsewhere in the prompt survive (no str.format)
    assert EditRequest("{} (born {year}) is", "X", "y").text == "X (born {year}) is"
    with pytest.raises(ValueError, match="exactly one"):
        fill(r, "no placeholder")


@pytest.mark.parametrize("kind", KINDS)
def test_validate_with_tokenizer(kind):
    tok = tiny_tokenizer(kind)
    r = EditRequest("{} plays the sport of", "LeBron James", "football")
    assert r.validate(tok) is r
    for special in (tok.eos_token, tok.pad_token):
        with pytest.raises(ValueError, match="no ordinary token"):
            EditRequest("{} plays", "LeBron James", special).validate(tok)


# ---------------------------------------------------------------- token positions
CASES = [  # (prompt, subject, template)
    ("{} plays the sport of", "LeBron James", "{}"),                      # subject at the very start
    ("The mother tongue of {} is", "Danielle Darrieux", "{}"),             # in the middle
    ("The mother tongue of {} is", "Danielle Darrieux", "Because the city of Paris. {}"),
    ("{} is a", "U.S.A.", "{}"),                                           # punctuation, at the start
    ("I think {}, which is", "Apple A5", "{}"),                            # followed by punctuation
    ("{}'s headquarters are in", "Toko Yasuda", "You. {}"),                # followed by 's
    ("Where is {}", "Berlin", "{}"),                                       # at the very end
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prompt, subject, template", CASES)
def test_subject_last_token(kind, prompt, subject, template):
    tok = tiny_tokenizer(kind)
    text, span = fill(EditRequest(prompt, subject, "x"), template)
    pos = subject_last_token(tok, text, span)
    assert pos == oracle_last_token(tok, text, span[1])
    ids = tok(text)["input_ids"]
    # the subject is complete at pos and not before
    assert tok.decode(ids[: pos + 1], skip_special_tokens=True).endswith(subject)
    assert subject not in tok.decode(ids[:pos], skip_special_tokens=True)[-len(subject):]


@pytest.mark.parametrize("kind", KINDS)
def test_subject_merged_with_following_text(kind):
    """'Danielle Darrie' + "ux's": the subject's last characters share the token 'eu' with the following text.
    We take that token: it contains the subject's last character and straddles the subject's end."""
    tok = tiny_tokenizer(kind)
    r = EditRequest("{}ux's mother tongue is", "Danielle Darrie", "x")
    pos = subject_last_token(tok, r.text, r.subject_span)
    a, b = tok(r.text, return_offsets_mapping=True)["offset_mapping"][pos]
    assert a < r.subject_span[1] < b
    assert pos == oracle_last_token(tok, r.text, r.subject_span[1])


@pytest.mark.parametrize("kind", KINDS)
def test_bos_and_padding(kind):
    tok = tiny_tokenizer(kind)
    texts = ["LeBron James plays", "Because of it. Danielle Darrieux is"]
    spans = [(0, 12), (15, 32)]
    ids, pos = encode_with_subject(tok, texts, spans)
    has_bos = kind == "sentencepiece"
    assert (ids[0][0] == tok.bos_token_id) == has_bos
    assert pos == [oracle_last_token(tok, t, s[1]) for t, s in zip(texts, spans)]
    input_ids, mask = pad_right(ids, 0)
    assert input_ids.shape == (2, max(map(len, ids)))
    assert mask.sum(1).tolist() == [len(x) for x in ids]
    assert mask[:, 0].tolist() == [1, 1]                       # right padding: real tokens first


def test_position_errors():
    tok = tiny_tokenizer("bpe")
    with pytest.raises(ValueError, match="empty or outside"):
        subject_last_token(tok, "abc", (1, 1))
    with pytest.raises(ValueError, match="empty or outside"):
        subject_last_token(tok, "abc", (0, 4))

    class Slow:
        is_fast = False
    with pytest.raises(TypeError, match="not a fast tokenizer"):
        subject_last_token(Slow(), "abc", (0, 1))


# ---------------------------------------------------------------- context templates
def test_context_templates_generate():
    model, tok = tiny_model("gpt2"), tiny_tokenizer("bpe")
    cpu_state = torch.random.get_rng_state()
    ct = ContextTemplates.memit(model, tok, seed=3)
    assert torch.equal(cpu_state, torch.random.get_rng_state())
    assert [len(g) for g in ct.groups] == [1, 5] and ct.groups[0] == ["{}"]
    assert all(t.count("{}") == 1 and t.endswith(". {}") for t in ct.groups[1])
    assert all("{" not in t[:-2] and "}" not in t[:-2] for t in ct.groups[1])
    assert ContextTemplates.memit(model, tok, seed=3) == ct
    assert ContextTemplates.memit(model, tok, seed=4) != ct
    # the random state the caller had does not matter
    torch.manual_seed(123)
    assert ContextTemplates.memit(model, tok, seed=3) == ct
    # length counts the start tokens: length 1 returns the start words unchanged
    assert ContextTemplates.generate(model, tok, [[1, 5]]).groups[1] == [
        w + ". {}" for w in ("The", "Therefore", "Because", "I", "You")]
    rome = ContextTemplates.rome(tiny_model("llama"), tiny_tokenizer("sentencepiece"), seed=0)
    assert [len(g) for g in rome.groups] == [1, 10, 10]


def test_context_templates_validation():
    with pytest.raises(ValueError, match="exactly one"):
        ContextTemplates([["{}"], ["no placeholder"]])
    with pytest.raises(ValueError, match="at least one"):
        ContextTemplates([])
    assert ContextTemplates.coerce(None) == ContextTemplates.bare()
    assert ContextTemplates.coerce(["{}", "a. {}"]).groups == [["{}", "a. {}"]]
    assert ContextTemplates.coerce([["{}"], ["a. {}"]]).groups == [["{}"], ["a. {}"]]


# ---------------------------------------------------------------- keys
REQS = [EditRequest("{} plays the sport of", "LeBron James", "football"),
        EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
        EditRequest("{}, which is located in", "Autonomous University of Madrid", "Sweden")]
TEMPLATES = ContextTemplates([["{}"], ["Because the city of Paris. {}", "I think. {}", "You said that it was. {}"]])


def plain_hook_inputs(model, tok, module, texts, ends):
    "Rewrite-module inputs at the subject's last token, one unpadded forward pass per text, with a raw forward hook."
    got = []
    h = module.register_forward_pre_hook(lambda m, args: got.append(args[0].detach()))
    try:
        rows = []
        for text, end in zip(texts, ends):
            got.clear()
            with torch.no_grad():
                model(tok(text, return_tensors="pt")["input_ids"])
            rows.append(got[0][0, oracle_last_token(tok, text, end)])
    finally:
        h.remove()
    return torch.stack(rows)


@pytest.mark.parametrize("kind", KINDS)
def test_keys_memit_mode_is_half_bare_half_prefix_mean(kind):
    model, tok = tiny_model(FAMILY[kind]), tiny_tokenizer(kind)
    ad, layer = ModelAdapter.from_model(model), 2
    K = compute_keys(model, tok, REQS, layer, TEMPLATES, batch_size=5)
    assert K.shape == (ad.d_in(layer), len(REQS))
    for e, r in enumerate(REQS):
        filled = [fill(r, t) for t in TEMPLATES.flat]
        A = plain_hook_inputs(model, tok, ad.module("rewrite", layer), [f[0] for f in filled], [f[1][1] for f in filled])
        torch.testing.assert_close(K[:, e], 0.5 * A[0] + 0.5 * A[1:].mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compute_keys(model, tok, [r], layer, TEMPLATES, mode="mean")[:, 0], A.mean(0),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compute_keys(model, tok, [r], layer, TEMPLATES, mode="bare")[:, 0], A[0],
                                   rtol=1e-5, atol=1e-6)


def test_keys_misc():
    model, tok = tiny_model("gpt2"), tiny_tokenizer("bpe")
    torch.testing.assert_close(compute_keys(model, tok, REQS, 1, TEMPLATES, batch_size=1),
                               compute_keys(model, tok, REQS, 1, TEMPLATES, batch_size=64), rtol=1e-5, atol=1e-6)
    assert template_weights([["{}"], ["a. {}"] * 4]).tolist() == [0.5, 0.125, 0.125, 0.125, 0.125]
    assert abs(template_weights(TEMPLATES, "mean").sum().item() - 1) < 1e-12
    with pytest.raises(ValueError, match="unknown key mode"):
        compute_keys(model, tok, REQS, 1, TEMPLATES, mode="median")
    with pytest.raises(ValueError, match="no edit requests"):
        compute_keys(model, tok, [], 1, TEMPLATES)
    ad = ModelAdapter.from_model(model)
    out = subject_activations(model, tok, REQS, ad.name("layer", 1), TEMPLATES, which="output")
    assert out.shape == (3, 4, 64)
    # dict requests work as well as EditRequests
    torch.testing.assert_close(compute_keys(model, tok, [r.to_dict() for r in REQS], 1, TEMPLATES),
                               compute_keys(model, tok, REQS, 1, TEMPLATES))
