"""Build a random-weight Llama model directory locally: no download, real compute.

    build_random_llama(path, "20m")   # ~23 M parameters, the CPU benchmark's default
    build_random_llama(path, "1b", device="cuda", dtype="bfloat16")

The tokenizer is a byte-level BPE trained on pseudo-words drawn from a fixed seed (a few
seconds), so prompts tokenize like text (one to two tokens per word) and the vocabulary, hence the
output layer, has a realistic size. The weights are random: the generated text is noise, the
forward pass costs what a trained model of that shape costs. The directory loads with
``AutoTokenizer``/``AutoModelForCausalLM`` like any hub model (it has a chat template), so the
server serves it with ``LLM_MODEL=<dir>``.

torch, tokenizers and transformers are imported inside the functions: importing this module is
free.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab: int
    """Target BPE vocabulary (the trained one may come out a little smaller)."""
    words: int = 3000
    corpus_words: int = 60_000


SIZES: dict[str, Shape] = {
    # Small enough to build in about a second, big enough that a forward pass is real work.
    "tiny": Shape(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab=512, words=800,
                  corpus_words=10_000),
    # The CPU default: ~23 M parameters (6 layers of width 512, 4 KV heads, vocabulary 4096).
    "20m": Shape(hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=4, vocab=4096),
    # The GPU shape: ~1.0 B parameters (the shape of the H200 measurements: hidden 2048,
    # 16 layers, 32 heads, 8 KV heads, MLP 8192, vocabulary 8192).
    "1b": Shape(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, vocab=8192, words=6000,
                corpus_words=120_000),
}

_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v",
           "w", "z", "br", "cl", "dr", "gr", "pl", "st", "tr", "sh", "ch", "th", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck", "ng"]


def word_list(n: int, seed: int = 1234) -> list[str]:
    """``n`` distinct pseudo-words (syllables from fixed tables), the same for the same seed."""
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                    for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def corpus(words: list[str], n_words: int, seed: int = 99) -> list[str]:
    """Sentences of Zipf-distributed words (rank r drawn with weight 1/r), with punctuation."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(words))]
    lines: list[str] = []
    made = 0
    while made < n_words:
        k = rng.randint(6, 24)
        ws = rng.choices(words, weights=weights, k=k)
        ws[0] = ws[0].capitalize()
        lines.append(" ".join(ws) + rng.choice([".", ".", ".", "?", "!", ","]))
        made += k
    return lines


def prompt_text(n_words: int, seed: int = 7) -> str:
    """A prompt of ``n_words`` pseudo-words from the tokenizer's training distribution."""
    words = word_list(SIZES["20m"].words)
    return " ".join(random.Random(seed).choices(words[:1000], k=n_words))


def build_random_llama(path: Path, size: str = "20m", device: str = "cpu",
                       dtype: str = "float32", seed: int = 0) -> dict[str, Any]:
    """Write tokenizer + random weights of shape ``SIZES[size]`` to ``path``; return a summary.

    Weights are created on ``device`` in ``dtype`` (a 1 B model is built on the GPU in seconds,
    on a CPU in minutes) and saved as safetensors.
    """
    if size not in SIZES:
        raise ValueError(f"size: {size!r} is not one of {', '.join(SIZES)}")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    shape = SIZES[size]
    t0 = time.monotonic()
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=shape.vocab, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(word_list(shape.words), shape.corpus_words), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)

    torch_dtype = getattr(torch, dtype)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.config.dtype = torch_dtype
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    del model
    return {"path": str(path), "size": size, "params": params, "vocab": len(fast),
            "dtype": dtype, "built_on": device, "seconds": round(time.monotonic() - t0, 2),
            "shape": asdict(shape)}
