"""Rendering conversations into token ids and loss labels, and the length policy.

Two templates:

``chat``
    The tokenizer's Jinja chat template. For every assistant turn ``i`` the prefix
    ``messages[:i]`` is rendered with ``add_generation_prompt=True`` (where the response starts)
    and ``messages[:i+1]`` without (where it ends); both renderings must be prefixes of the full
    conversation's rendering, as text and as token ids, or a ``ValueError`` names the template
    problem. The labelled span runs from the end of the generation prompt through the last stop
    token (eos or the template's end-of-turn token, e.g. ``<|im_end|>``) inside the turn; what the
    template adds after it (ChatML's ``"\\n"``) is scaffolding and masked, as is everything
    outside the assistant turns. Texts are tokenised with ``add_special_tokens=False`` (the
    template writes any bos itself), exactly as ``apply_chat_template(tokenize=True)`` does.
``plain``
    For tokenizers without a chat template; each turn is rendered as::

        system:     "{content}\\n\\n"
        user:       "### Instruction:\\n{content}\\n\\n"
        assistant:  "### Response:\\n" + "{content}" + eos   (then "\\n\\n" before a next turn)

    so a prompt/response pair is ``"### Instruction:\\n{prompt}\\n\\n### Response:\\n{response}"``
    followed by the eos token. The masked text before a response and the response itself are
    tokenised separately (no token merges across the boundary), the eos *id* is appended, and a
    bos id is put first when the tokenizer adds one by itself (Llama-style). Labels cover each
    response and its eos.

Labels are ``-100`` on every masked position; position 0 is never labelled (no token predicts
it). The mask comes from positions, never from token ids (pad is often eos).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "IGNORE_INDEX",
    "PLAIN_TEMPLATE",
    "TEMPLATES",
    "TRUNCATION_POLICIES",
    "Encoded",
    "encode",
    "fit_length",
    "resolve_template",
    "stop_token_ids",
    "trim_conversations",
]

IGNORE_INDEX = -100
TEMPLATES = ("auto", "chat", "plain")
TRUNCATION_POLICIES = ("truncate", "drop", "error")
PLAIN_TEMPLATE = {
    "system": "{content}\n\n",
    "user": "### Instruction:\n{content}\n\n",
    "generation_prompt": "### Response:\n",
    "turn_separator": "\n\n",
}


@dataclass
class Encoded:
    """One tokenised conversation.

    Attributes:
        input_ids: the token ids.
        labels: ``input_ids`` on response tokens, ``IGNORE_INDEX`` elsewhere.
        prompt_len: tokens before the last response (the generation prompt included).
        prompt_text: the rendered text of those tokens.
        reference: the last response's text, stripped.
        cut_prompt_ids: the prompt's ids when truncation cut into them (else None).
    """

    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    prompt_text: str
    reference: str
    cut_prompt_ids: list[int] | None = None

    def prompt_ids(self) -> list[int]:
        """The ids before the last response, as rendered (never truncated)."""
        if self.cut_prompt_ids is not None:
            return list(self.cut_prompt_ids)
        return self.input_ids[: self.prompt_len]


def resolve_template(tokenizer, template: str, chat_template: str | None = None) -> str:
    """``"chat"`` or ``"plain"``; installs ``chat_template`` (Jinja text or a file) first.

    Raises:
        ValueError: unknown ``template``, or ``"chat"`` for a tokenizer without a chat template.
    """
    if template not in TEMPLATES:
        raise ValueError(f"data.template={template!r}: expected one of {list(TEMPLATES)}")
    if chat_template is not None:
        path = Path(chat_template).expanduser()
        is_file = "{" not in chat_template and path.is_file()
        tokenizer.chat_template = path.read_text(encoding="utf-8") if is_file else chat_template
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise ValueError(
            "data.template='chat' but the tokenizer has no chat template; set "
            "data.chat_template (Jinja text or a .jinja file) or use data.template='plain'"
        )
    if template == "auto":
        return "chat" if has_chat else "plain"
    return template


def trim_conversations(convs: list[list[dict]]) -> tuple[list[list[dict]], list[int]]:
    """Cut each conversation after its last non-empty assistant turn.

    Returns:
        (the kept conversations, their row indices); rows without one are left out.
    """
    kept, rows = [], []
    for r, conv in enumerate(convs):
        last = [i for i, m in enumerate(conv) if m["role"] == "assistant" and m["content"].strip()]
        if last:
            kept.append(conv[: last[-1] + 1])
            rows.append(r)
    return kept, rows


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return ids | {i for i, t in decoder.items() if getattr(t, "special", False)}


def stop_token_ids(tokenizer, template: str) -> list[int]:
    """Token ids that end a response: eos, and for ``chat`` the template's end-of-turn token.

    The end-of-turn token is the first special token the template writes after the content of
    a probe assistant turn (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3).
    """
    out = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if template != "chat":
        return out
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
    try:
        start = tokenizer.apply_chat_template(probe[:1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template that rejects the probe: eos only
        return out
    if not full.startswith(start):
        return out
    special = _special_ids(tokenizer)
    tail = tokenizer(full[len(start) :], add_special_tokens=False)["input_ids"]
    eot = next((t for t in tail if t in special), None)
    if eot is not None and eot not in out:
        out.append(int(eot))
    return out


def _labels(ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    for s, e in spans:
        labels[s:e] = ids[s:e]
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def _render(tokenizer, conv: list[dict], gen: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    except Exception as err:
        raise ValueError(f"{where}: the chat template failed to render it: {err}") from err


def _prefix_error(where: str, what: str) -> ValueError:
    return ValueError(
        f"{where}: the chat template is not prefix-consistent: {what}, so the response "
        "tokens cannot be located; use data.template='plain' or a data.chat_template that "
        "renders earlier turns the same way whatever follows them"
    )


def _encode_chat(tokenizer, convs, wheres, stop_ids) -> list[Encoded]:
    texts: list[str] = []
    plans = []
    for conv, where in zip(convs, wheres):
        full = _render(tokenizer, conv, False, where)
        turns, full_idx = [], len(texts)
        texts.append(full)
        for a in (i for i, m in enumerate(conv) if m["role"] == "assistant"):
            if a == 0:
                raise ValueError(
                    f"{where}: the conversation starts with an assistant turn; a chat template "
                    "needs a system or user message before it (or use data.template='plain')"
                )
            last = a == len(conv) - 1
            p = _render(tokenizer, conv[:a], True, where)
            e = full if last else _render(tokenizer, conv[: a + 1], False, where)
            if not (e.startswith(p) and full.startswith(e)):
                what = (
                    f"messages[:{a}] rendered with add_generation_prompt=True is not a prefix of "
                    f"messages[:{a + 1}] rendered"
                    if not e.startswith(p)
                    else f"messages[:{a + 1}] rendered is not a prefix of the whole conversation"
                )
                raise _prefix_error(where, what)
            turns.append((a, len(texts), None if last else len(texts) + 1))
            texts.extend([p] if last else [p, e])
        plans.append((full_idx, turns))
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stop = set(stop_ids)
    out = []
    for conv, where, (full_idx, turns) in zip(convs, wheres, plans):
        full = ids[full_idx]
        spans = []
        for a, p_idx, e_idx in turns:
            start = len(ids[p_idx])
            end = len(full) if e_idx is None else len(ids[e_idx])
            for idx in (p_idx, e_idx):
                if idx is not None and full[: len(ids[idx])] != ids[idx]:
                    raise _prefix_error(
                        where,
                        f"the token ids of the rendering up to turn {a} are not a prefix of the "
                        "whole conversation's token ids (a token merges across the boundary)",
                    )
            cut = [k + 1 for k in range(start, end) if full[k] in stop]
            spans.append((start, cut[-1] if cut else end))
        last_p = turns[-1][1]
        out.append(
            Encoded(full, _labels(full, spans), spans[-1][0], texts[last_p], _reference(conv))
        )
    return out


def _reference(conv: list[dict]) -> str:
    return conv[-1]["content"].strip()


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    return bool(with_special) and with_special[0] == bos


def _encode_plain(tokenizer, convs) -> list[Encoded]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the plain template needs a tokenizer with an eos token")
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    bos_text, eos_text = (tokenizer.bos_token if bos else ""), tokenizer.eos_token
    pieces: list[str] = []
    plans = []
    for conv in convs:
        ops, masked = [], ""
        for m in conv:
            if m["role"] == "assistant":
                ops.append((len(pieces), False))
                ops.append((len(pieces) + 1, True))
                pieces.extend([masked + PLAIN_TEMPLATE["generation_prompt"], m["content"]])
                masked = PLAIN_TEMPLATE["turn_separator"]
            else:
                masked += PLAIN_TEMPLATE[m["role"]].format(content=m["content"])
        plans.append(ops)
    piece_ids = tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
    out = []
    for conv, ops in zip(convs, plans):
        ids, spans, text = list(bos), [], bos_text
        prompt_len, prompt_text = 0, ""
        for idx, labelled in ops:
            if labelled:
                prompt_len, prompt_text = len(ids), text
                spans.append((len(ids), len(ids) + len(piece_ids[idx]) + 1))
                ids.extend([*piece_ids[idx], eos])
                text += pieces[idx] + eos_text
            else:
                ids.extend(piece_ids[idx])
                text += pieces[idx]
        out.append(Encoded(ids, _labels(ids, spans), prompt_len, prompt_text, _reference(conv)))
    return out


def encode(
    tokenizer, convs: list[list[dict]], template: str, wheres: list[str], stop_ids: list[int]
) -> list[Encoded]:
    """Tokenise trimmed conversations (see the module docstring).

    Args:
        tokenizer: a transformers tokenizer.
        convs: conversations ending with a non-empty assistant turn.
        template: ``"chat"`` or ``"plain"``.
        wheres: how errors name each row (e.g. ``"data.train_file='a.jsonl' row 3"``).
        stop_ids: :func:`stop_token_ids` (chat only: where a labelled span ends).

    Raises:
        ValueError: the chat template fails on a row or is not prefix-consistent.
    """
    if not convs:
        return []
    if template == "chat":
        return _encode_chat(tokenizer, convs, wheres, stop_ids)
    return _encode_plain(tokenizer, convs)


def fit_length(
    examples: list[Encoded],
    wheres: list[str],
    max_length: int,
    policy: str,
    min_response_tokens: int = 1,
) -> tuple[list[int], dict[str, int]]:
    """Apply the truncation policy in place; returns (indices kept, counts).

    ``truncate`` cuts the sequence at ``max_length`` (the response tail goes) and drops the
    example when fewer than ``min_response_tokens`` labelled tokens remain ("prompt leaves no
    room"); ``drop`` drops over-long examples; ``error`` raises on the first one.

    Returns:
        indices into ``examples``, and ``{"truncated", "dropped_too_long", "dropped_no_room"}``.

    Raises:
        ValueError: an unknown policy, or an over-long example under ``error``.
    """
    if policy not in TRUNCATION_POLICIES:
        raise ValueError(f"data.truncation={policy!r}: expected one of {list(TRUNCATION_POLICIES)}")
    counts = {"truncated": 0, "dropped_too_long": 0, "dropped_no_room": 0}
    kept = []
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        if n <= max_length:
            kept.append(i)
        elif policy == "error":
            raise ValueError(
                f"{wheres[i]}: {n} tokens > data.max_length={max_length} "
                "(data.truncation='error'); raise max_length or use 'truncate' or 'drop'"
            )
        elif policy == "drop":
            counts["dropped_too_long"] += 1
        elif sum(t != IGNORE_INDEX for t in ex.labels[:max_length]) < min_response_tokens:
            counts["dropped_no_room"] += 1
        else:
            if ex.prompt_len > max_length:
                ex.cut_prompt_ids = ex.input_ids[: ex.prompt_len]
            ex.input_ids, ex.labels = ex.input_ids[:max_length], ex.labels[:max_length]
            counts["truncated"] += 1
            kept.append(i)
    return kept, counts
