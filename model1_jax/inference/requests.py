"""What a scheduler is asked for and what it returns (docs/serving.md §3): `Request`, `Completion`, and the
stop rules (stop tokens, stop strings through a tokenizer's `decode`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from model1_jax.common import check_token_ids, positive_int
from model1_jax.inference.sampling import Sampling

FINISH_REASONS = ("stop", "length")


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request.

    prompt: token ids. stop_tokens: ids that end the request (emitted, then it stops); None = the scheduler's
    default (the config's eos ids). stop_strings: text that ends it once the decoded output contains it (needs a
    tokenizer); the completion's text is cut before it. seed: this request's random stream (None: the
    scheduler's seed and the request's index), so sampled tokens do not depend on which other requests run
    beside it. id: any value, returned with the completion.
    """

    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    stop_tokens: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    id: Any = None

    @classmethod
    def make(cls, prompt, max_new_tokens: int, *, vocab_size: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, sampling: Sampling | None = None, stop_tokens: Sequence[int] | None = None,
             stop_strings: Sequence[str] | str = (), seed: int | None = None, id: Any = None,
             what: str = "request") -> Request:
        """A checked request: every problem is a ValueError naming `what` and the field."""
        prompt = np.asarray(prompt)
        check_token_ids(prompt, vocab_size, f"{what}: prompt", ndim=1)
        positive_int(max_new_tokens, f"{what}: max_new_tokens")
        sampling = sampling or Sampling(temperature, top_k, top_p)
        if stop_tokens is not None:
            if not isinstance(stop_tokens, Sequence | np.ndarray) or isinstance(stop_tokens, str) or any(
                    not isinstance(s, int | np.integer) or isinstance(s, bool) or not 0 <= s < vocab_size
                    for s in stop_tokens):
                raise ValueError(f"{what}: stop_tokens must be a list of ids in [0, {vocab_size}), got {stop_tokens!r}")
            stop_tokens = tuple(int(s) for s in stop_tokens)
        if isinstance(stop_strings, str):
            stop_strings = (stop_strings,)
        if not isinstance(stop_strings, Sequence) or any(not isinstance(s, str) or not s for s in stop_strings):
            raise ValueError(f"{what}: stop_strings must be non-empty strings, got {stop_strings!r}")
        stop_strings = tuple(stop_strings)
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"{what}: seed must be an integer >= 0, got {seed!r}")
        return cls(tuple(int(x) for x in prompt), int(max_new_tokens), sampling, stop_tokens, stop_strings,
                   None if seed is None else int(seed), id)

    @property
    def reserve(self) -> int:
        """Positions this request can ever feed (it never feeds its last emitted token): its cache bound."""
        return len(self.prompt) + self.max_new_tokens


@dataclasses.dataclass
class Completion:
    """A finished request. `index` is its submission order; `tokens` the generated ids (a stop token or the
    token that completed a stop string included); `text` the decoded tokens (with a tokenizer), cut before a stop
    string; `stop` the stop token or string that ended it (None for "length"); `confidence` (DSpark) the
    drafter's sigmoid(confidence) of the G drafts of each decode step the request took [steps, G]."""

    index: int
    id: Any
    prompt_tokens: int
    tokens: list[int]
    finish_reason: str  # "stop" or "length"
    stop: int | str | None = None
    text: str | None = None
    confidence: Any = None


class Output:
    """A running request's generated tokens and its stop rules."""

    def __init__(self, request: Request, stop_tokens: tuple[int, ...], tokenizer=None):
        self.request, self.stop_tokens, self.tokenizer = request, frozenset(stop_tokens), tokenizer
        self.tokens: list[int] = []
        self.finish: tuple[str, int | str | None] | None = None
        self.text: str | None = None
        self.confidence: list = []  # DSpark: one [G] row per decode step

    def add(self, token: int) -> bool:
        """Appends a generated token; True when the request is finished."""
        self.tokens.append(int(token))
        if token in self.stop_tokens:
            self.finish = ("stop", int(token))
        elif self.request.stop_strings:
            # The whole text each time: decoding a token can change the characters before it (an incomplete
            # UTF-8 sequence completed), so only a full search is exact.
            self.text = self.tokenizer.decode(self.tokens)
            hits = [(pos, s) for s in self.request.stop_strings if (pos := self.text.find(s)) >= 0]
            if hits:
                pos, s = min(hits)
                self.text = self.text[:pos]
                self.finish = ("stop", s)
        if self.finish is None and len(self.tokens) >= self.request.max_new_tokens:
            self.finish = ("length", None)
        return self.finish is not None

    def completion(self, index: int) -> Completion:
        cut = isinstance(self.finish[1], str)  # ended by a stop string: the text stops before it
        text = self.text if cut else (None if self.tokenizer is None else self.tokenizer.decode(self.tokens))
        return Completion(index=index, id=self.request.id, prompt_tokens=len(self.request.prompt),
                          tokens=list(self.tokens), finish_reason=self.finish[0], stop=self.finish[1], text=text,
                          confidence=np.stack(self.confidence) if self.confidence else None)
