"""A teacher served by vLLM's OpenAI server: its top-k prompt log-probs score the rollouts.

One kept httpx client (connect and read timeouts); a request that meets a connection error, a
timeout, HTTP 429 or a 5xx is tried again (`retries`, exponential backoff from `backoff_s` with
jitter), any other 4xx or a malformed answer at once ends the run. The wire format follows the
vLLM 0.33.0 wheel source (read, not run against a live server):

- GET {url}/models (vllm/entrypoints/openai/models/api_router.py:20) returns
  {"object": "list", "data": [{"id": name, ...}]}
  (vllm/entrypoints/serve/engine/protocol.py:105-118).
- POST {url}/completions (vllm/entrypoints/openai/completion/api_router.py:38) takes
  `CompletionRequest` (vllm/entrypoints/openai/completion/protocol.py:49): `prompt` may be a list
  of token-id lists (l.53-59), passed to the engine as given, nothing added
  (vllm/renderers/inputs/preprocess.py:134-138); `prompt_logprobs: int` is a vLLM extra (l.99);
  `return_token_ids` (l.172) adds the generated ids to each choice (l.688).
- One choice per prompt, in prompt order (completion/serving.py:245-248, `index=len(choices)` at
  l.636-637), each with `prompt_logprobs: list[dict[int, Logprob] | None]` (protocol.py:689,
  filled at serving.py:642). Logprob = {logprob, rank, decoded_token} (vllm/logprobs.py:13-25).
  Entry 0 is None (vllm/logprobs.py:165-170); entry i is log p(token_i | tokens_<i) for the top-k
  ids plus the actual prompt token, included even outside the top-k
  (vllm/v1/sample/sampler.py:373-421: `cat((token_ids, topk_indices))`; vllm/logprobs.py:178-209).
  JSON object keys are strings. -inf is sent as -9999.0
  (vllm/entrypoints/generate/base/serving.py:381-393).
- The values are log_softmax of the raw logits, temperature 1, over the model's whole lm_head
  (vllm/v1/worker/gpu_model_runner.py:5321-5330). The server refuses prompt_logprobs above
  --max-logprobs, 20 by default (vllm/config/model.py:286, vllm/sampling_params.py:973-982).
"""

from __future__ import annotations

import json
import math
import random
import time
from typing import TYPE_CHECKING, Any

import httpx
import torch
from torch import Tensor

from ..errors import UserError

if TYPE_CHECKING:
    from ..config import TeacherServerCfg

__all__ = ["TeacherServer"]


class TeacherServer:
    """Client of a vLLM OpenAI-compatible server that holds the teacher."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        top_k: int = 20,
        timeout_s: float = 120.0,
        batch_size: int = 16,
        retries: int = 5,
        backoff_s: float = 1.0,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.top_k = top_k
        self.timeout_s = timeout_s
        self.batch_size = batch_size
        self.retries = retries
        self.backoff_s = backoff_s
        self.connect_timeout_s = connect_timeout_s
        self._http: httpx.Client | None = None  # kept across requests (connection reuse)

    @classmethod
    def from_config(cls, cfg: TeacherServerCfg) -> TeacherServer:
        return cls(
            cfg.url, cfg.model, cfg.top_k, cfg.timeout_s, cfg.batch_size,
            cfg.retries, cfg.backoff_s, cfg.connect_timeout_s,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"{self.url} ({self.model})"

    # ------------------------------------------------------------------------- HTTP
    @property
    def http(self) -> httpx.Client:
        """The kept client: one connection pool, connect and read timeouts from the config."""
        if self._http is None:
            timeout = httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)
            self._http = httpx.Client(timeout=timeout, headers={"Content-Type": "application/json"})
        return self._http

    def close(self) -> None:
        """Close the kept connections (a later request opens new ones)."""
        if self._http is not None:
            self._http.close()
            self._http = None

    def _delay(self, attempt: int) -> float:
        """Seconds before try `attempt + 1`: backoff_s * 2**(attempt - 1), jittered by ±50%."""
        return self.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """GET (body None) or POST JSON to {url}{path}, tried again on a connection error, a
        timeout, 429 or 5xx; a failure is a UserError naming the URL (and the attempts)."""
        target = f"{self.url}{path}"
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                if body is None:
                    resp = self.http.get(target)
                else:
                    resp = self.http.post(target, content=json.dumps(body).encode())
                code = resp.status_code
                if code == 429 or code >= 500:
                    reason = f"HTTP {code}: {resp.text[:200]}"
                elif code >= 400:
                    raise UserError(
                        f"teacher server {target} answered HTTP {code}: {resp.text[:500]}"
                    )
                else:
                    try:
                        return resp.json()
                    except ValueError:
                        raise UserError(
                            f"teacher server {target} did not answer JSON "
                            f"(it began {resp.text[:80]!r})"
                        ) from None
            except httpx.TransportError as e:  # connect, timeout, connection dropped
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if attempt < attempts:
                time.sleep(self._delay(attempt))
        raise UserError(
            f"teacher server {target} is unreachable: no answer after {attempts} attempt"
            f"{'s' if attempts > 1 else ''} (last: {reason}); start it (vllm serve ...) or fix "
            "teacher_server.url; a run's last checkpoint is kept, continue with --resume"
        )

    def connect(self) -> str:
        """Check the server answers and serves the model (resolving model=None); return its name."""
        listing = self._request("/models")
        served = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)]
        if self.model is None:
            if len(served) != 1:
                raise UserError(
                    f"teacher server {self.url} serves {served or 'no models'}; "
                    "set teacher_server.model"
                )
            self.model = served[0]
        elif self.model not in served:
            raise UserError(
                f"teacher server {self.url} does not serve {self.model!r} (it serves {served})"
            )
        return self.model

    def _completions(self, prompts: list[list[int]], **params: Any) -> list[dict[str, Any]]:
        """One choice per prompt, `batch_size` prompts per request, in prompt order."""
        out: list[dict[str, Any]] = []
        for i in range(0, len(prompts), self.batch_size):
            part = prompts[i : i + self.batch_size]
            body = {"model": self.model, "prompt": part, "n": 1, **params}
            choices = self._request("/completions", body).get("choices") or []
            if len(choices) != len(part):
                raise UserError(
                    f"teacher server {self.url} returned {len(choices)} choices for "
                    f"{len(part)} prompts"
                )
            out.extend(sorted(choices, key=lambda c: c.get("index", 0)))
        return out

    # ------------------------------------------------------------------------- API
    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[dict[str, Any] | None]]:
        """vLLM's prompt_logprobs of each token sequence (entry i scores token i; entry 0 None)."""
        choices = self._completions(
            sequences, max_tokens=1, temperature=0.0, prompt_logprobs=self.top_k
        )
        out = []
        for seq, choice in zip(sequences, choices, strict=True):
            plp = choice.get("prompt_logprobs")
            if not isinstance(plp, list) or len(plp) != len(seq):
                raise UserError(
                    f"teacher server {self.url} gave no prompt_logprobs of the prompt's length "
                    "(is it vLLM's OpenAI server? prompt_logprobs is a vLLM extension)"
                )
            out.append(plp)
        return out

    def score(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_mask: Tensor,
        prompt_len: int,
        vocab_size: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher log-probs at the response positions of a rollout grid [B, P + T].

        Returns ids [B, T, top_k + 1] (-1 pad) and their log-probs (-inf pad): the teacher's
        top-k plus the sampled token, as vLLM returns them, ids >= vocab_size (padded lm_head
        rows) dropped; and log p_T(y_t) [B, T] of the sampled tokens (0 off the response).
        """
        b, total = input_ids.shape
        t, device = total - prompt_len, input_ids.device
        width = self.top_k + 1
        ids = torch.full((b, t, width), -1, dtype=torch.long)
        lps = torch.full((b, t, width), -math.inf, dtype=torch.float32)
        tok_lp = torch.zeros((b, t), dtype=torch.float32)
        input_ids, attn = input_ids.cpu(), attention_mask.cpu().bool()
        resp = response_mask[:, prompt_len:].cpu()
        rows = [i for i in range(b) if bool(resp[i].any())]
        seqs = [input_ids[i][attn[i]].tolist() for i in rows]
        for i, seq, plp in zip(rows, seqs, self.prompt_logprobs(seqs), strict=True):
            n_prompt = int(attn[i, :prompt_len].sum())
            for j in resp[i].nonzero().squeeze(-1).tolist():
                entry = plp[n_prompt + j]
                y = seq[n_prompt + j]
                if not entry or str(y) not in entry:
                    raise UserError(
                        f"teacher server {self.url} left out the prompt token's log-prob "
                        "(vLLM always includes it)"
                    )
                tok_lp[i, j] = float(entry[str(y)]["logprob"])
                known = [(int(k), float(v["logprob"])) for k, v in entry.items()]
                known = [kv for kv in known if 0 <= kv[0] < vocab_size][:width]
                if known:
                    ids[i, j, : len(known)] = torch.tensor([k for k, _ in known])
                    lps[i, j, : len(known)] = torch.tensor([v for _, v in known])
        return ids.to(device), lps.to(device), tok_lp.to(device)

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, stop_token_ids: list[int]
    ) -> list[list[int] | str]:
        """Greedy completions (temperature 0): generated ids, or the text if ids are absent."""
        choices = self._completions(
            prompts,
            max_tokens=max_new_tokens,
            temperature=0.0,
            stop_token_ids=stop_token_ids,
            return_token_ids=True,
        )
        return [c["token_ids"] if c.get("token_ids") is not None else c["text"] for c in choices]
