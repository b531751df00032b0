"""What the server's transformers engine (and server.bench's transformers mode) uses of the
pinned transformers is in its facts file, read at that version's tag.

The code is read as source (its imports, the keyword arguments it passes the model, the
library calls it makes), so a new call that the facts do not list fails here until someone reads
it at the pinned version and records it. The facts are then held against the installed library,
which requirements pin to the same version.
"""

from __future__ import annotations

import ast
import inspect
import re
from importlib import metadata
from pathlib import Path

import pytest

from tests.contracts import facts

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "server/engines/transformers.py"
BATCHING = ROOT / "server/engines/batching.py"
SAMPLING = ROOT / "server/engines/sampling.py"
BENCH = ROOT / "server/bench_transformers.py"
USERS = [ENGINE, BATCHING, SAMPLING, BENCH, ROOT / "server/engines/random_llama.py"]


def _pinned_version() -> str:
    text = (ROOT / "server/requirements.txt").read_text()
    match = re.search(r"^transformers==(\S+)$", text, re.M)
    assert match, "server/requirements.txt pins transformers"
    return match.group(1)


FACTS = facts.load("transformers", _pinned_version())


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _calls(path: Path, name: str) -> list[ast.Call]:
    """Calls whose function is ``name`` or ``<anything>.name``."""
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == name) or (
                    isinstance(f, ast.Attribute) and f.attr == name):
                found.append(node)
    return found


def _model_calls(path: Path) -> list[ast.Call]:
    """Calls of the model itself: ``self.model(...)`` or ``model(...)``."""
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == "model") or (
                    isinstance(f, ast.Attribute) and f.attr == "model"
                    and isinstance(f.value, ast.Name) and f.value.id == "self"):
                found.append(node)
    return found


def _keywords(calls: list[ast.Call]) -> set[str]:
    return {k.arg for c in calls for k in c.keywords if k.arg is not None}


def test_the_facts_are_for_the_pinned_and_installed_version() -> None:
    assert FACTS["version"] == _pinned_version()
    assert metadata.version("transformers") == FACTS["version"]


def test_every_name_imported_from_transformers_is_listed() -> None:
    imported = set()
    for path in USERS:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and node.module == "transformers":
                imported |= {a.name for a in node.names}
    assert imported and imported <= set(FACTS["imports"]), imported - set(FACTS["imports"])
    logging_calls = {n for path in USERS for n in ("set_verbosity_error", "disable_progress_bar",
                                                    "set_verbosity", "enable_progress_bar")
                     if _calls(path, n)}
    assert logging_calls <= set(FACTS["logging"])


def test_keyword_arguments_given_to_the_model_are_its_forward_arguments() -> None:
    used = _keywords(_model_calls(BATCHING) + _model_calls(BENCH))
    assert {"input_ids", "position_ids", "attention_mask", "logits_to_keep"} <= used
    assert used <= set(FACTS["model"]["forwardKwargs"]), used - set(FACTS["model"]["forwardKwargs"])
    # the cache goes in as **{cache_arg: ...}; the engine picks the name the facts record
    assert FACTS["model"]["cacheKwarg"] == "cache"
    assert '"cache" if "cache" in params' in ENGINE.read_text()


def test_the_slot_cache_implements_what_the_model_calls_on_a_cache() -> None:
    from server.engines.slot_cache import SlotKVCache

    model = FACTS["model"]
    assert model["mask4dReturnedAsIs"] and model["positionIdsComputedOnlyWhenNone"]
    assert model["nonCacheObjectLayerIndex"] == 0  # a plain object is fine as the cache
    for method in model["cacheMethodsCalled"] + model["cacheMethodsCalledWithoutPositionIds"]:
        assert callable(getattr(SlotKVCache, method, None)), method
    params = inspect.signature(SlotKVCache.update).parameters
    assert list(params)[:4] == ["self", "key_states", "value_states", "layer_idx"]
    assert any(p.kind is p.VAR_KEYWORD for p in params.values())  # update(..., kwargs=...)


def test_loading_uses_listed_arguments_and_attention_that_takes_our_mask() -> None:
    calls = _calls(ENGINE, "from_pretrained")
    kwargs = _keywords(calls)
    model_kwargs = kwargs - {"revision"}
    assert model_kwargs <= set(FACTS["fromPretrained"]["kwargs"])
    impls = {k.value.value for c in calls for k in c.keywords
             if k.arg == "attn_implementation" and isinstance(k.value, ast.Constant)}
    assert impls == {"sdpa", "eager"}
    assert impls <= set(FACTS["attention"]["takeA4dFloatMask"])
    src = ENGINE.read_text()
    for error in FACTS["attention"]["sdpaFallbackErrors"]:
        assert error in src  # the eager fallback catches what a failed sdpa request raises


def test_detokenisation_and_templates_use_listed_tokenizer_arguments() -> None:
    decode = _keywords(_calls(SAMPLING, "decode"))
    assert decode and decode <= set(FACTS["tokenizer"]["decodeKwargs"])
    template = _keywords(_calls(ENGINE, "apply_chat_template") + _calls(BENCH,
                                                                         "apply_chat_template"))
    assert template <= set(FACTS["tokenizer"]["applyChatTemplateKwargs"])


def test_the_benchmark_uses_listed_cache_and_continuous_batching_apis() -> None:
    cb = FACTS["continuousBatching"]
    for cls in ("DynamicCache", "StaticCache"):
        used = _keywords(_calls(BENCH, cls))
        assert used and used <= set(FACTS["caches"][cls]["initKwargs"]), (cls, used)
    tree = _tree(BENCH)
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert {"generate_batch", "init_continuous_batching"} <= attrs
    library = {a for a in attrs if a in cb["entryPoints"] or a in cb["managerMethods"]}
    manager_like = {"start", "stop", "add_requests", "get_result"}
    assert manager_like <= library
    assert _keywords(_calls(BENCH, "ContinuousBatchingConfig")) <= set(cb["configFields"])
    assert _keywords(_calls(BENCH, "GenerationConfig")) <= set(cb["generationConfigKwargs"])


def test_why_the_engine_does_not_use_the_library_scheduler_is_still_true() -> None:
    """The reasons the engine's docstring gives; if a new pin changes them, revisit."""
    cb = FACTS["continuousBatching"]
    assert cb["samplingGenerator"].startswith("global")
    assert cb["seedIsProcessWide"] and cb["doSamplePerManager"]
    assert cb["perRequestProcessorsDefault"] is False and cb["temperatureProcessorDivides"]
    doc = ENGINE.read_text()
    assert "torch.multinomial" in doc and "per manager" in doc


# --- the facts against the installed library (the same version) --------------------------


def test_the_facts_hold_in_the_installed_library() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers import ContinuousBatchingConfig, DynamicCache, LlamaForCausalLM, StaticCache
    from transformers.generation.continuous_batching import ContinuousBatchingManager

    for name in FACTS["imports"]:
        assert hasattr(transformers, name), name
    forward = inspect.signature(LlamaForCausalLM.forward).parameters
    assert set(FACTS["model"]["forwardKwargs"]) <= set(forward)
    for cls in ("DynamicCache", "StaticCache"):
        init = inspect.signature({"DynamicCache": DynamicCache,
                                  "StaticCache": StaticCache}[cls].__init__).parameters
        assert set(FACTS["caches"][cls]["initKwargs"]) <= set(init), cls
    cb = FACTS["continuousBatching"]
    for method in cb["managerMethods"]:
        assert callable(getattr(ContinuousBatchingManager, method)), method
    for entry in cb["entryPoints"]:
        assert callable(getattr(LlamaForCausalLM, entry)), entry
    fields = set(inspect.signature(ContinuousBatchingConfig).parameters)
    assert set(cb["configFields"]) <= fields
    for fn in FACTS["logging"]:
        assert callable(getattr(transformers.utils.logging, fn)), fn
