"""rollout.py: response masks, padding layout, seeding, and logit positions matching generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from taopd.data import render_prompt
from taopd.errors import UserError
from taopd.models import hidden_states, lm_head, load_model, load_tokenizer
from taopd.training.rollout import Rollout, generate, response_mask
from taopd.training.sampling import make_sampler

EOS = 2
QUESTIONS = [
    "1 + 2 =",
    "State the final answer to the following arithmetic problem: 37 - 85 =",
    "9",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    """(model, tokenizer, chat prompts of different lengths) for the tiny model."""
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    prompts = [render_prompt(tok, q) for q in QUESTIONS]
    return model, tok, prompts


def test_response_mask_unit() -> None:
    resp = torch.tensor(
        [
            [5, 6, EOS, 7, EOS],  # eos in the middle: kept, the rest dropped
            [EOS, 5, 6, 7, 8],  # eos first: only it
            [5, 6, 7, 8, 9],  # no eos: all
            [5, 6, 7, 8, 9],  # no eos, generation of this row stopped at 3 tokens
        ]
    )
    mask = response_mask(resp, [EOS], lengths=torch.tensor([5, 5, 5, 3]))
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0],
            [1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    # several eos ids (e.g. <|im_end|> and <|endoftext|>)
    assert response_mask(torch.tensor([[5, 0, 2, 7]]), [2, 0]).tolist() == [
        [True, True, False, False]
    ]


def _check_layout(roll: Rollout, tok, eos_ids: list[int]) -> None:
    """Invariants of a rollout: masks, padding, eos handling, texts."""
    b, t = roll.input_ids.shape
    p = roll.prompt_len
    assert roll.attention_mask.shape == roll.response_mask.shape == (b, t)
    assert roll.response_mask.dtype == torch.bool
    assert not roll.response_mask[:, :p].any()  # prompt positions never count
    resp = roll.input_ids[:, p:]
    rmask = roll.response_mask[:, p:]
    for i in range(b):
        n = int(rmask[i].sum())
        assert n >= 1
        assert rmask[i, :n].all() and not rmask[i, n:].any()  # contiguous from the prompt
        is_eos = torch.isin(resp[i, :n], torch.tensor(eos_ids))
        assert not is_eos[:-1].any()  # no eos before the last kept token
        assert (resp[i, n:] == tok.pad_token_id).all()  # right padding after the response
        ids = resp[i, :n].tolist()
        assert roll.texts[i] == tok.decode(ids, skip_special_tokens=True)
    # attention covers the real prompt tokens and exactly the kept response tokens
    assert torch.equal(roll.attention_mask[:, p:].bool(), rmask)
    assert (roll.attention_mask[:, :p].sum(dim=1) > 0).all()
    assert roll.response_lengths.tolist() == rmask.sum(dim=1).tolist()


def test_generate_layout_with_eos(tiny) -> None:
    model, tok, prompts = tiny
    # push eos up so that some rows end early and others run to max_new_tokens
    roll = generate(model, tok, prompts * 4, max_new_tokens=10, seed=0, sequence_bias={(EOS,): 4.0})
    _check_layout(roll, tok, [EOS])
    lengths = roll.response_lengths
    ended = (
        torch.isin(roll.response_ids, torch.tensor([EOS]))
        & roll.response_mask[:, roll.prompt_len :]
    )
    assert ended.any(dim=1).any() and (~ended.any(dim=1)).any()
    assert int(lengths.min()) < 10 and int(lengths.max()) == 10
    # prompt block: left padded, the end of each prompt is the generation prompt
    suffix = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    for i in range(len(roll)):
        assert roll.input_ids[i, roll.prompt_len - len(suffix) : roll.prompt_len].tolist() == suffix


def test_generate_seeded_and_batched(tiny) -> None:
    model, tok, prompts = tiny
    a = generate(model, tok, prompts, max_new_tokens=6, seed=123)
    b = generate(model, tok, prompts, max_new_tokens=6, seed=123)
    c = generate(model, tok, prompts, max_new_tokens=6, seed=124)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    g1 = generate(model, tok, prompts, max_new_tokens=6, greedy=True)
    g2 = generate(model, tok, prompts, max_new_tokens=6, greedy=True, batch_size=1)
    assert torch.equal(g1.input_ids, g2.input_ids)  # per-batch prompt trimming changes nothing
    assert g1.texts == g2.texts


def test_hidden_states_reproduce_generate_logits(tiny) -> None:
    """hidden[:, prompt_len-1:-1] @ W^T predicts input_ids[:, prompt_len:] as generate did."""
    model, tok, prompts = tiny
    roll = generate(model, tok, prompts, max_new_tokens=8, greedy=True)
    with torch.no_grad():
        h = hidden_states(model, roll.input_ids, roll.attention_mask)
        logits = h[:, roll.prompt_len - 1 : -1] @ lm_head(model).T
    target = roll.input_ids[:, roll.prompt_len :]
    keep = roll.response_mask[:, roll.prompt_len :]
    assert logits.shape[:2] == target.shape
    assert torch.equal(logits.argmax(-1)[keep], target[keep])

    # and the logits themselves: generate's own scores equal the recomputed ones
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **enc,
        max_new_tokens=4,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=EOS,
    )
    scores = torch.stack(out.logits, dim=1)  # [B, 4, V]
    p = enc.input_ids.shape[1]
    assert torch.equal(
        out.sequences[:, p:],
        roll.input_ids[:, p : p + 4].masked_fill(~roll.response_mask[:, p : p + 4], EOS),
    )
    mask = torch.cat([enc.attention_mask, torch.ones_like(out.sequences[:, p:])], dim=1)
    with torch.no_grad():
        h = hidden_states(model, out.sequences, mask)
    recomputed = h[:, p - 1 : -1] @ lm_head(model).T
    valid = roll.response_mask[:, p : p + 4]
    assert valid.any()
    torch.testing.assert_close(recomputed[valid], scores[valid], atol=1e-5, rtol=1e-4)


def test_generate_restores_training_mode_and_padding_side(tiny) -> None:
    model, tok, prompts = tiny
    model.train()
    tok.padding_side = "right"
    try:
        roll = generate(model, tok, prompts, max_new_tokens=3, greedy=True)
        assert model.training and tok.padding_side == "right"
        _check_layout(roll, tok, [EOS])
    finally:
        model.eval()
        tok.padding_side = "left"


def test_generate_argument_errors(tiny) -> None:
    model, tok, prompts = tiny
    with pytest.raises(UserError, match="temperature"):
        generate(model, tok, prompts, max_new_tokens=3, temperature=0.0)
    with pytest.raises(UserError, match="max_new_tokens"):
        generate(model, tok, prompts, max_new_tokens=0)


def test_make_sampler() -> None:
    assert make_sampler("hf") is generate
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"pip install 'taopd\[vllm\]'"):
            make_sampler("vllm")
    with pytest.raises(UserError, match="unknown sampling backend"):
        make_sampler("sglang")
