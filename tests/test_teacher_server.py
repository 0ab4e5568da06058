"""A teacher served over HTTP (vLLM prompt_logprobs) against the in-process teacher, on tiny models.

The fake server below (loopback only) answers GET /v1/models and POST /v1/completions in vLLM
0.33.0's format (see taopd/training/teacher_server.py for the source lines): per prompt token a dict
id -> {logprob, rank, decoded_token} holding the actual token (first) and the top-k, None for the
first token. It can also blink: 503s, a hang, a dropped connection, malformed JSON.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from taopd.config import load_config
from taopd.core.loss import selective_head_loss
from taopd.core.scores import signals_from_hidden, signals_from_teacher_topk
from taopd.core.selection import STRATEGIES, STRATEGY_SIGNALS, select_tokens, strategy_scores
from taopd.errors import UserError
from taopd.models import lm_head, load_model, load_tokenizer
from taopd.training.checkpoint import latest_checkpoint
from taopd.training.rollout import generate, response_hidden
from taopd.training.teacher_server import TeacherServer
from taopd.training.train import Trainer, train
from tests.helpers import make_tiny_model_dir

K = 16


class FakeVLLM:
    """vLLM's OpenAI completions server in miniature: one HF model, greedy, prompt_logprobs."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "tiny-teacher") -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.requests: list[dict[str, Any]] = []
        # faults for the next POSTs, one each: "503", "hang" (past the client's timeout),
        # "drop" (the connection closed mid-answer), "garbage" (malformed JSON); `down`: 503 always
        self.faults: list[str] = []
        self.down = False
        self.hang_s = 1.0
        self.faults_met = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                if self.path != "/v1/models":
                    return self._send(404, {"error": "not found"})
                card = {"id": fake.name, "object": "model", "owned_by": "vllm", "root": fake.name}
                self._send(200, {"object": "list", "data": [card]})

            def _fault(self) -> bool:
                """Apply the next fault, if any; True when the answer was (mis)sent."""
                fault = "503" if fake.down else (fake.faults.pop(0) if fake.faults else None)
                if fault is None:
                    return False
                fake.faults_met += 1
                if fault == "503":
                    self._send(503, {"error": "overloaded"})
                elif fault == "hang":
                    time.sleep(fake.hang_s)
                    self.close_connection = True  # the client has given up on this one
                elif fault == "drop":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b'{"choices": [')  # part of the body, then closed
                    self.wfile.flush()
                    self.close_connection = True
                elif fault == "garbage":
                    data = b'{"choices": [{"index": 0,'
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                return True

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self._fault():
                    return
                fake.requests.append(body)
                if self.path != "/v1/completions" or body.get("model") != fake.name:
                    return self._send(404, {"error": f"model {body.get('model')} not found"})
                choices = [fake.choice(i, p, body) for i, p in enumerate(body["prompt"])]
                self._send(
                    200, {"object": "text_completion", "model": fake.name, "choices": choices}
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @torch.no_grad()
    def choice(self, index: int, ids: list[int], body: dict[str, Any]) -> dict[str, Any]:
        """One choice as vLLM builds it (prompt_logprobs: None, then one dict per prompt token)."""
        x = torch.tensor([ids])
        plp: list[dict[str, Any] | None] | None = None
        k = body.get("prompt_logprobs")
        if k is not None:
            logp = torch.log_softmax(self.model(x).logits[0].float(), -1)  # whole lm_head
            k = logp.shape[-1] if k == -1 else k
            plp = [None]
            for i in range(1, len(ids)):
                row, tid = logp[i - 1], ids[i]
                top_v, top_i = row.topk(k)
                pairs = [(tid, float(row[tid]), int((row > row[tid]).sum()) + 1)]
                pairs += [(int(t), float(v), r + 1) for r, (v, t) in enumerate(zip(top_v, top_i))]
                entry: dict[str, Any] = {}
                for t, v, rank in pairs:  # the actual token first; a repeat overwrites its value
                    entry[str(t)] = {
                        "logprob": -9999.0 if v == -math.inf else v,
                        "rank": rank,
                        "decoded_token": self.tokenizer.decode([t]),
                    }
                plp.append(entry)
        n = int(body.get("max_tokens") or 16)
        out = self.model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False
        )
        new = out[0, len(ids) :].tolist()
        stops = set(body.get("stop_token_ids") or []) | {self.tokenizer.eos_token_id}
        for j, t in enumerate(new):
            if t in stops:
                new = new[: j + 1]
                break
        return {
            "index": index,
            "text": self.tokenizer.decode(new, skip_special_tokens=True),
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "token_ids": new if body.get("return_token_ids") else None,
            "prompt_logprobs": plp,
            "prompt_token_ids": None,
        }

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Teacher and student of one tokenizer, lm_heads unpadded (vLLM normalizes over the head)."""
    student_dir = make_tiny_model_dir(tmp_path_factory.mktemp("student"), seed=3, hidden=48)
    return {
        "student_dir": student_dir,
        "teacher_dir": tiny_model_dir,
        "student": load_model(str(student_dir)),
        "teacher": load_model(str(tiny_model_dir)),
        "tok": load_tokenizer(str(tiny_model_dir)),
    }


@pytest.fixture(scope="module")
def server(pair: dict[str, Any]):
    fake = FakeVLLM(pair["teacher"], pair["tok"])
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def rollout(pair: dict[str, Any]) -> dict[str, Any]:
    tok = pair["tok"]
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"{a} + {b} = ?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for a, b in [(1, 2), (12, 7), (40, 55), (3, 9), (70, 1), (8, 88)]
    ]
    roll = generate(pair["student"], tok, prompts, max_new_tokens=8, seed=0)
    with torch.no_grad():
        h_s = response_hidden(pair["student"], roll)
        h_t = response_hidden(pair["teacher"], roll)
    p = roll.prompt_len
    return {
        "roll": roll,
        "h_s": h_s,
        "h_t": h_t,
        "targets": roll.input_ids[:, p:],
        "valid": roll.response_mask[:, p:],
    }


def _both(pair: dict[str, Any], rollout: dict[str, Any], server: FakeVLLM, top_k: int):
    vocab = len(pair["tok"])
    roll, valid, targets = rollout["roll"], rollout["valid"], rollout["targets"]
    ref = signals_from_hidden(
        rollout["h_s"], lm_head(pair["student"]), rollout["h_t"], lm_head(pair["teacher"]),
        tokens=targets, k=K, valid=valid, vocab_size=vocab,
    )  # fmt: skip
    client = TeacherServer(server.url, top_k=top_k, batch_size=4)
    assert client.connect() == "tiny-teacher"
    ids, lps, tok_lp = client.score(
        roll.input_ids, roll.attention_mask, roll.response_mask, roll.prompt_len, vocab
    )
    got = signals_from_teacher_topk(
        rollout["h_s"], lm_head(pair["student"]), ids, lps, tok_lp, targets, k=K, valid=valid,
        vocab_size=vocab, chunk_size=7,
    )  # fmt: skip
    return ref, got, valid


def test_full_vocabulary_top_k_equals_the_in_process_teacher(pair, rollout, server):
    vocab = len(pair["tok"])
    ref, got, valid = _both(pair, rollout, server, top_k=vocab)
    assert int(valid.sum()) > 20
    close = dict(atol=1e-5, rtol=0)
    torch.testing.assert_close(got.compatibility_lb[valid], ref.compatibility[valid], **close)
    torch.testing.assert_close(got.compatibility[valid], ref.compatibility[valid], **close)
    torch.testing.assert_close(got.disagreement[valid], ref.disagreement[valid], **close)
    torch.testing.assert_close(got.log_ratio[valid], ref.log_ratio[valid], **close)
    torch.testing.assert_close(got.student_entropy[valid], ref.student_entropy[valid], **close)
    torch.testing.assert_close(got.overlap[valid], ref.overlap[valid], **close)
    for name in ("teacher_entropy", "reverse_kl", "forward_kl"):
        assert torch.isnan(getattr(got, name)).all()
    # requests: token-id prompts, prompt_logprobs = top_k, 4 sequences per call at most
    posts = [r for r in server.requests if "prompt_logprobs" in r]
    assert posts and all(r["prompt_logprobs"] == vocab and len(r["prompt"]) <= 4 for r in posts)
    assert all(isinstance(t, int) for r in posts for seq in r["prompt"] for t in seq)


def test_small_top_k_bounds_compatibility_and_mostly_agrees(pair, rollout, server):
    ref, got, valid = _both(pair, rollout, server, top_k=K)
    c_hat, c, c_lb = got.compatibility[valid], ref.compatibility[valid], ref.compatibility_lb[valid]
    assert bool((c_hat <= c + 1e-6).all())  # Ĉ is a lower bound of C (Eq. 17)
    assert bool((c_hat >= c_lb - 1e-6).all())  # ... at least Eq. 17's (the sampled token is known)
    assert bool((c_hat < c - 1e-3).any())  # and not C itself: the test can tell them apart
    # exact whatever k: the sampled token's log-ratio, the student's entropy, the top-K overlap
    torch.testing.assert_close(got.log_ratio[valid], ref.log_ratio[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.overlap[valid], ref.overlap[valid], atol=1e-6, rtol=0)
    # teachability selection at a 30% budget: most kept positions are the same
    a = select_tokens(ref, valid, "teachability", 0.3)
    b = select_tokens(got, valid, "teachability", 0.3)
    agree = float((a & b).sum() / a.sum())
    assert agree >= 0.7, agree  # measured 0.87 (13 of 15 kept positions) at top_k = K = 16


def test_pg_loss_from_teacher_token_logprobs_equals_the_logits_path():
    torch.manual_seed(0)
    b, t, d, v = 2, 5, 8, 11
    h = torch.randn(b, t, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    t_logits = torch.randn(b, t, v)
    tokens = torch.randint(0, v, (b, t))
    mask = torch.rand(b, t) > 0.4
    lt = torch.log_softmax(t_logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    grads = []
    for kw in ({"teacher_logits": t_logits}, {"teacher_token_logprobs": lt}):
        loss = selective_head_loss(h, w, mask, kind="pg", tokens=tokens, chunk_size=3, **kw)
        g = torch.autograd.grad(loss, [h, w])
        grads.append((loss.detach(), *g))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y)
    assert grads[0][0].abs() > 0
    with pytest.raises(ValueError, match="kind 'pg' only"):
        selective_head_loss(h, w, mask, kind="reverse_kl", tokens=tokens, teacher_token_logprobs=lt)


def test_every_strategy_declares_its_signals_and_nan_signals_are_refused(pair, rollout, server):
    assert set(STRATEGY_SIGNALS) == set(STRATEGIES)
    _, got, valid = _both(pair, rollout, server, top_k=K)
    with pytest.raises(ValueError, match="reverse_kl"):
        strategy_scores("reverse_kl", got, valid)
    assert torch.isfinite(strategy_scores("teachability", got, valid)[valid]).all()


def _cfg(pair: dict[str, Any], out: Path, url: str, *extra: str):
    return load_config(
        None,
        [
            f"student={pair['student_dir']}",
            f"teacher={pair['teacher_dir']}",
            f"output_dir={out}",
            f"teacher_server.url={url}",
            "teacher_server.batch_size=3",
            "loss.kind=pg",
            "task.n_train=32",
            "task.n_test=4",
            "train.steps=3",
            "train.batch_size=4",
            "rollout.max_new_tokens=5",
            "eval.max_new_tokens=4",
            "eval.heldout_kl_prompts=4",
            "train.tensorboard=false",
            "train.eval_before=false",
            "train.samples_every=1",
            "selection.ratio=0.5",
            "optim.lr=3e-3",
            "teacher_server.retries=2",
            "teacher_server.backoff_s=0.01",
            *extra,
        ],
    )


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_trainer_with_a_served_teacher_trains(pair, server, tmp_path):
    out = tmp_path / "run"
    summary = train(_cfg(pair, out, server.url), progress=False)
    assert summary["steps"] == 3 and summary["tokens_trained"] > 0
    assert summary["heldout_kl"] is None and summary["heldout_kl_before"] is None
    assert 0.0 <= summary["teacher_accuracy"] <= 1.0  # greedy completions from the server
    assert summary["teacher"].startswith(server.url)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0
        assert math.isfinite(r["kl_sampled_all"]) and math.isfinite(r["teachability_all"])
        assert "kl_all" not in r and "teacher_entropy_all" not in r
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert sample["teacher_top"] and "reverse_kl" not in sample["signals"]
    before = _weights(Path(pair["student_dir"]))
    after = _weights(latest_checkpoint(out / "checkpoints") / "model")
    assert after
    moved = [n for n in after if n in before and not torch.equal(before[n], after[n])]
    assert moved  # the student was trained through the served teacher's log-probs


def test_iw_opd_weights_train_through_a_served_teacher(pair, server, tmp_path):
    """IW-OPD reads only the sampled-token log-ratio, which a served teacher gives."""
    out = tmp_path / "run"
    extra = ("selection.strategy=iw_opd", "selection.mode=weight", "selection.ratio=1")
    summary = train(_cfg(pair, out, server.url, *extra, "train.steps=2"), progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and summary["mode"] == "weight"
    for r in rows:
        assert r["n_selected"] == r["n_valid"] and math.isfinite(r["loss"])
        assert r["weight_min"] >= 1.0 and r["weight_max"] <= 1.5 + 1e-9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_fails_fast_without_touching_the_output(pair, tmp_path):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    out = tmp_path / "never"
    with pytest.raises(UserError, match=url.replace(".", r"\.")) as e:
        Trainer(_cfg(pair, out, url), progress=False)
    assert "unreachable" in str(e.value)
    assert not out.exists()


def test_unserved_model_is_refused(pair, server, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(UserError, match="does not serve 'other'"):
        Trainer(_cfg(pair, out, server.url, "teacher_server.model=other"), progress=False)
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["loss.kind=reverse_kl"], "needs loss.kind 'pg'"),
        (["selection.strategy=reverse_kl"], "teachability"),
        (["selection.strategy=reverse_kl", "selection.mode=weight", "selection.ratio=1"], "iw_opd"),
        (["teacher_server.top_k=8"], "must be >= selection.k"),
        (["loss.temperature=2"], "temperature 1"),
    ],
)
def test_config_refuses_what_a_served_teacher_cannot_give(pair, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        _cfg(pair, tmp_path / "x", "http://127.0.0.1:9/v1", *extra)


def test_served_teacher_two_processes_equal_one(pair, server, tmp_path):
    """Each of 2 processes (accelerate launch, gloo) queries the server for its own rows; the
    run ends with the weights, accuracy and token count of 1 process (greedy rollouts)."""
    from tests.test_distributed import launch

    finals, summaries = {}, {}
    for name, procs in (("one", 1), ("two", 2)):
        out = tmp_path / name
        cfg = _cfg(pair, out, server.url, "rollout.greedy=true", "train.samples_every=0")
        path = tmp_path / f"{name}.yaml"
        path.write_text(cfg.to_yaml())
        launch(path, procs)
        finals[name] = _weights(latest_checkpoint(out / "checkpoints") / "model")
        summaries[name] = json.loads((out / "summary.json").read_text())
        assert summaries[name]["world_size"] == procs and summaries[name]["steps"] == 3
    for k in finals["one"]:
        assert torch.allclose(finals["one"][k], finals["two"][k], atol=2e-5), k
    for key in ("student_accuracy_after", "teacher_accuracy", "tokens_trained"):
        assert summaries["two"][key] == pytest.approx(summaries["one"][key], rel=1e-4), key
    before = _weights(Path(pair["student_dir"]))
    assert any(not torch.equal(before[k], finals["two"][k]) for k in before)


# ------------------------------------------------------------------------- a server that blinks


def _client(url: str, **kw: Any) -> TeacherServer:
    kw = {"top_k": K, "batch_size": 4, "retries": 3, "backoff_s": 0.01, "timeout_s": 0.5, **kw}
    client = TeacherServer(url, **kw)
    client.connect()
    return client


def _score(client: TeacherServer, pair: dict[str, Any], rollout: dict[str, Any]):
    roll = rollout["roll"]
    return client.score(
        roll.input_ids, roll.attention_mask, roll.response_mask, roll.prompt_len, len(pair["tok"])
    )


@pytest.mark.parametrize("faults", [["503"] * 3, ["hang"], ["drop"]], ids=["503x3", "hang", "drop"])
def test_blinks_are_retried_and_give_the_healthy_signals(pair, rollout, server, faults):
    healthy = _score(_client(server.url), pair, rollout)
    server.hang_s = 1.5  # past the client's 0.5 s read timeout
    server.faults, server.faults_met = list(faults), 0
    try:
        got = _score(_client(server.url), pair, rollout)
    finally:
        server.faults = []
    assert server.faults_met == len(faults)  # every fault was met, and then recovered from
    for a, b in zip(healthy, got, strict=True):
        assert torch.equal(a, b)


def test_malformed_json_ends_at_once_with_one_line(pair, rollout, server):
    client = _client(server.url)
    server.faults, server.faults_met = ["garbage", "garbage"], 0
    try:
        with pytest.raises(UserError, match=r"/completions did not answer JSON") as e:
            _score(client, pair, rollout)
    finally:
        server.faults = []
    assert server.faults_met == 1 and "\n" not in str(e.value)  # not retried


def test_other_4xx_is_not_retried(pair, rollout, server):
    client = _client(server.url)
    client.model = "unserved"  # the fake answers 404
    before = len(server.requests)
    with pytest.raises(UserError, match="answered HTTP 404"):
        _score(client, pair, rollout)
    assert len(server.requests) == before + 1


def test_server_that_stays_down_ends_the_run_then_resume_finishes(pair, server, tmp_path):
    """Down after the step-2 checkpoint: one line with the URL and the attempts, the checkpoint
    intact; once it is back, --resume ends on the weights of an uninterrupted run."""
    extra = ("train.save_every=1", "train.samples_every=0")
    ref = tmp_path / "ref"
    train(_cfg(pair, ref, server.url, *extra), progress=False)
    out = tmp_path / "run"
    trainer = Trainer(_cfg(pair, out, server.url, *extra), progress=False)
    real_save = trainer.save

    def save() -> Path | None:
        path = real_save()
        server.down = trainer.step == 2
        return path

    trainer.save = save  # type: ignore[method-assign]
    try:
        with pytest.raises(UserError) as e:
            trainer.run()
    finally:
        server.down = False
    msg = str(e.value)
    assert server.url in msg and "after 3 attempts" in msg and "--resume" in msg
    assert "\n" not in msg
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and ckpt.name == "step-000002"
    train(_cfg(pair, out, server.url, *extra), resume=True, progress=False)
    want = _weights(latest_checkpoint(ref / "checkpoints") / "model")
    got = _weights(latest_checkpoint(out / "checkpoints") / "model")
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)
