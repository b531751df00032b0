"""Per-request sampling for a whole batch on the model's device, and incremental detokenisation.

**Sampling.** One step's logits ``[n, vocab]`` are turned into ``n`` tokens with a handful of
batched tensor operations on the device: greedy rows (temperature 0) take the argmax; the others
are scaled by their temperature, restricted to their nucleus (``top_p``) and sampled with the
exponential race, ``argmax(p / q)`` with ``q ~ Exp(1)``, which draws token ``i`` with probability
``p_i / sum(p)``. The only per-row work is filling that row's ``q`` from the request's own
``torch.Generator`` (created on the device and seeded from the request's ``seed``): a request's
random stream then depends on its seed and on how many tokens it has drawn, never on which other
requests share the batch, so the same seed gives the same text under any load. Only the chosen
token ids (``n`` integers) leave the device.

**Detokenisation.** :class:`IncrementalDetokenizer` decodes a small window of the last tokens
per new token (the approach of text-generation-inference's ``decode_token``): the text of
``ids[prefix:]`` minus the text of ``ids[prefix:read]``. A window ending inside a multi-byte
character decodes to U+FFFD and is held back until the character is complete; the window then
moves on. The cost per token is constant, where decoding the whole output again grows with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def sample(torch: Any, logits: Any, temperature: Sequence[float], top_p: Sequence[float],
           generators: Sequence[Any]) -> Any:
    """Next token of each row of ``logits`` ([n, vocab], float32, on the device).

    ``temperature[i] == 0`` is greedy (``generators[i]`` is then unused and may be None).
    Returns a long tensor of ``n`` ids on the device.
    """
    greedy = logits.argmax(dim=-1)
    if all(t == 0 for t in temperature):
        return greedy
    device = logits.device
    temp = torch.tensor(temperature, dtype=torch.float32, device=device)
    scaled = logits / torch.where(temp > 0, temp, torch.ones_like(temp)).unsqueeze(1)
    probs = torch.softmax(scaled, dim=-1)
    if any(p < 1.0 for p in top_p):
        nucleus = torch.tensor(top_p, dtype=torch.float32, device=device).unsqueeze(1)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always the most likely token)
        sorted_p = sorted_p.masked_fill(torch.cumsum(sorted_p, dim=-1) - sorted_p >= nucleus, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
    race = torch.ones_like(probs)
    for i, gen in enumerate(generators):
        if temperature[i] > 0:
            race[i].exponential_(generator=gen)
    race.clamp_(min=torch.finfo(torch.float32).tiny)
    sampled = (probs / race).argmax(dim=-1)
    return torch.where(temp > 0, sampled, greedy)


class IncrementalDetokenizer:
    """Text deltas of a growing list of token ids, decoding only a short window each time."""

    __slots__ = ("_decode", "ids", "_prefix", "_read")

    def __init__(self, tokenizer: Any) -> None:
        decode = tokenizer.decode

        def _decode(ids: list[int]) -> str:
            if not ids:
                return ""
            return decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

        self._decode = _decode
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, token: int) -> str:
        """Append ``token``; return the text it completes ("" while a character is partial)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end of a sequence: emit even a partial char)."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):]
