"""A KV cache of fixed slots, one per running sequence, that a batched step reads and writes.

Each layer owns two buffers of shape ``[slots, kv_heads, capacity, head_dim]``. A running
sequence owns one slot (one row) and keeps its tokens at positions ``0 .. length-1`` of it, so
sequences of different lengths sit side by side without padding in front of them:

* **prefill** of ``m`` new sequences (one right-padded forward over their prompts): each layer's
  new keys/values are written to positions ``0 .. P-1`` of the sequences' slots, and attention
  runs over the prompt itself (a causal mask; padding sits after the real tokens, so no real
  token sees it).
* **decode** of the ``n`` running sequences, which occupy slots ``0 .. n-1`` (the engine keeps
  them packed: :meth:`move` fills the hole a finished sequence leaves): the new token of row
  ``i`` is written at position ``pos[i]`` and attention reads the first ``width`` positions of
  the rows, with a mask that hides, per row, the positions at or beyond its own length.

The object is handed to a transformers model as its ``cache``; the model calls
:meth:`update` once per attention layer (the only method it uses when it is given
``position_ids`` and a ready 4D mask; see tests/contracts/data/transformers-5.24.0.json).
Before a forward pass, the runner picks the mode with :meth:`for_prefill` or
:meth:`for_decode`. Every tensor the decode path touches keeps its address from step to step
for a given ``(rows, width)``, which is what a CUDA-graph replay needs.
"""

from __future__ import annotations

from typing import Any


class SlotKVCache:
    def __init__(self, torch: Any, layers: int, slots: int, kv_heads: int, head_dim: int,
                 dtype: Any, device: Any, capacity: int, max_capacity: int) -> None:
        if capacity > max_capacity:
            raise ValueError(f"capacity {capacity} exceeds max_capacity {max_capacity}")
        self.torch = torch
        self.layers, self.slots = layers, slots
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.max_capacity = max_capacity
        self.capacity = 0
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self._mode = ""
        self._slots: Any = None
        self._prompt_len = 0
        self._rows: Any = None
        self._pos: Any = None
        self._width = 0
        self.grow(capacity)

    # --- storage ---------------------------------------------------------------------------

    def grow(self, needed: int) -> bool:
        """Make room for ``needed`` positions per slot (capacity doubles, up to the maximum).

        Returns True when the buffers were reallocated (their addresses changed)."""
        if needed <= self.capacity:
            return False
        if needed > self.max_capacity:
            raise ValueError(f"{needed} positions exceed the cache's maximum {self.max_capacity}")
        cap = max(16, self.capacity)
        while cap < needed:
            cap *= 2
        cap = min(cap, self.max_capacity)
        shape = (self.slots, self.kv_heads, cap, self.head_dim)
        torch = self.torch
        new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                 for _ in range(self.layers)]
        new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                 for _ in range(self.layers)]
        for old, new in zip(self.keys + self.values, new_k + new_v):
            new[:, :, : self.capacity].copy_(old)
        self.keys, self.values, self.capacity = new_k, new_v, cap
        return True

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        for buf in self.keys + self.values:
            buf[dst, :, :length].copy_(buf[src, :, :length])

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.keys + self.values)

    # --- modes ------------------------------------------------------------------------------

    def for_prefill(self, slots: Any, prompt_len: int) -> None:
        """Next forward computes ``prompt_len`` (padded) prompt tokens for ``slots`` (a long
        tensor of slot numbers, one per batch row)."""
        self._mode, self._slots, self._prompt_len = "prefill", slots, prompt_len

    def for_decode(self, rows: Any, pos: Any, width: int) -> None:
        """Next forward computes one token per row; row ``i`` is slot ``rows[i]`` (slots
        ``0..len(rows)-1``), its token goes to position ``pos[i]``, and attention reads
        positions ``0 .. width-1``."""
        self._mode, self._rows, self._pos, self._width = "decode", rows, pos, width

    # --- the model's interface --------------------------------------------------------------

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[Any, Any]:
        """Store this layer's new keys/values; return what the layer's attention reads."""
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        if self._mode == "decode":
            # One token per row: [n, heads, 1, dim] -> positions pos[i] of rows[i].
            k_buf[self._rows, :, self._pos] = key_states[:, :, 0]
            v_buf[self._rows, :, self._pos] = value_states[:, :, 0]
            n = key_states.shape[0]
            return k_buf[:n, :, : self._width], v_buf[:n, :, : self._width]
        if self._mode == "prefill":
            p = self._prompt_len
            k_buf[self._slots, :, :p] = key_states
            v_buf[self._slots, :, :p] = value_states
            return key_states, value_states
        raise RuntimeError("SlotKVCache.update called before for_prefill/for_decode")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens already cached before this forward (transformers asks when it is not given
        position ids; the engine always gives them)."""
        return self._width - 1 if self._mode == "decode" else 0
