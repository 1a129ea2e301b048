"""Module type and depth from qualified module names (for grouping final ranks).

Types: ``query``, ``key``, ``value``, ``qkv`` (fused), ``attention-output``, ``intermediate``,
``output``; anything else falls back to the last non-numeric, non-generic name component.

    >>> module_type("bert.encoder.layer.3.attention.self.query")
    'query'
    >>> module_type("bert.encoder.layer.3.attention.output.dense")
    'attention-output'
    >>> module_type("model.layers.0.mlp.down_proj")
    'output'
    >>> module_depth("transformer.h.11.attn.c_attn")
    11
"""

from __future__ import annotations

import re

__all__ = ["module_type", "module_depth", "display_order", "TYPE_ORDER"]

#: display order of the known types
TYPE_ORDER = ("query", "key", "value", "qkv", "attention-output", "intermediate", "output")

_LEAF = {
    "query": "query",
    "q": "query",
    "q_proj": "query",
    "q_lin": "query",
    "wq": "query",
    "key": "key",
    "k": "key",
    "k_proj": "key",
    "k_lin": "key",
    "wk": "key",
    "value": "value",
    "v": "value",
    "v_proj": "value",
    "v_lin": "value",
    "wv": "value",
    "c_attn": "qkv",
    "qkv": "qkv",
    "qkv_proj": "qkv",
    "query_key_value": "qkv",
    "Wqkv": "qkv",
    "o_proj": "attention-output",
    "out_proj": "attention-output",
    "out_lin": "attention-output",
    "wo": "attention-output",
    "o": "attention-output",
    "gate_proj": "intermediate",
    "up_proj": "intermediate",
    "c_fc": "intermediate",
    "fc1": "intermediate",
    "lin1": "intermediate",
    "w1": "intermediate",
    "w3": "intermediate",
    "wi": "intermediate",
    "dense_h_to_4h": "intermediate",
    "down_proj": "output",
    "fc2": "output",
    "lin2": "output",
    "w2": "output",
    "dense_4h_to_h": "output",
}
_GENERIC = {"dense", "linear", "proj", "c_proj", "weight", "layer", "fc"}
_ATTENTION = {"attention", "attn", "self_attn", "self_attention", "selfattention", "attn_layer"}
_MLP = {"mlp", "ffn", "feed_forward", "feedforward"}


def module_type(name: str) -> str:
    """Infer the role of a linear module from its qualified name (see module docstring)."""
    parts = [p for p in name.split(".") if p]
    if not parts:
        return "other"
    leaf = parts[-1]
    if leaf in _LEAF:
        return _LEAF[leaf]
    parents = parts[:-1]
    lowered = [p.lower() for p in parents]
    if leaf in _GENERIC:
        # BERT: attention.output.dense / intermediate.dense / output.dense;
        # GPT-2: attn.c_proj / mlp.c_proj
        if "intermediate" in lowered:
            return "intermediate"
        if any(p in _ATTENTION for p in lowered):
            return "attention-output"
        if "output" in lowered or any(p in _MLP for p in lowered):
            return "output"
    for part in reversed(parts):
        if not part.isdigit() and part not in _GENERIC:
            return part
    return leaf


def module_depth(name: str) -> int | None:
    """The first integer component of the name (the block index), or None."""
    for part in name.split("."):
        if re.fullmatch(r"\d+", part):
            return int(part)
    return None


def display_order(names: list[str]) -> list[str]:
    """Names sorted by depth, then type (:data:`TYPE_ORDER`), then name; depth-less ones first."""

    def key(name: str) -> tuple[int, int, str]:
        depth, t = module_depth(name), module_type(name)
        return (
            -1 if depth is None else depth,
            TYPE_ORDER.index(t) if t in TYPE_ORDER else 99,
            name,
        )

    return sorted(names, key=key)
