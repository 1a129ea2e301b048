"""Built-in instruction data: prompt/response rows made from the built-in corpora.

``rotten_tomatoes``: every fresh/rotten review snippet of :func:`load_rotten_tomatoes` becomes
the pair ``{"prompt": SENTIMENT_PROMPT.format(text=...), "response": "positive" | "negative"}``
(fresh → positive, rotten → negative), in corpus order.
"""

from __future__ import annotations

from collections.abc import Callable

from adarank.data.rotten_tomatoes import load_rotten_tomatoes

__all__ = ["INSTRUCTION_DATASETS", "SENTIMENT_ANSWERS", "SENTIMENT_PROMPT", "rotten_tomatoes_rows"]

SENTIMENT_PROMPT = (
    "Is the following movie review positive or negative? Answer with one word.\n\nReview: {text}"
)
SENTIMENT_ANSWERS = {"fresh": "positive", "rotten": "negative"}  # corpus label -> response


def rotten_tomatoes_rows(download: bool = True) -> list[dict[str, str]]:
    """Instruction pairs of the rotten_tomatoes snippets (12,808 rows, corpus order).

    Args:
        download: fetch the corpus if it is missing (see :func:`corpus_path`).

    Returns:
        ``[{"prompt": str, "response": "positive" | "negative"}, ...]``.
    """
    texts, labels = load_rotten_tomatoes(download)
    return [
        {"prompt": SENTIMENT_PROMPT.format(text=t.strip()), "response": SENTIMENT_ANSWERS[y]}
        for t, y in zip(texts, labels)
    ]


INSTRUCTION_DATASETS: dict[str, Callable[[], list[dict[str, str]]]] = {
    "rotten_tomatoes": rotten_tomatoes_rows,
}
