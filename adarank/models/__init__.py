"""Model builders: Hugging Face models (incl. offline built-ins and LLMs) and the planted task.

Builders are plain functions with flat, typed arguments so configs can name them with
``_component_`` (see :mod:`adarank.config`).
"""

from adarank.models.hf import (
    BUILTIN_MODELS,
    TASKS,
    TINY_MODELS,
    TOKENIZER_OPTIONS,
    build_hf_model,
    build_tokenizer,
    resolve_name_or_path,
    tokenizer_kwargs,
)
from adarank.models.llm import DTYPES, enable_gradient_checkpointing

__all__ = [
    "BUILTIN_MODELS",
    "DTYPES",
    "TASKS",
    "TINY_MODELS",
    "TOKENIZER_OPTIONS",
    "build_hf_model",
    "build_planted_model",
    "build_tokenizer",
    "enable_gradient_checkpointing",
    "resolve_name_or_path",
    "tokenizer_kwargs",
]


def build_planted_model(data):
    """The frozen parallel-linear model of a planted task (``data`` is injected by the wiring).

    Args:
        data: a :class:`adarank.data.planted.PlantedDataModule`; its planted task owns the model.
    """
    task = getattr(data, "planted", None)
    if task is None:
        raise TypeError(
            f"build_planted_model needs the planted data module (data._component_="
            f"adarank.data.build_planted_data), got {type(data).__name__}"
        )
    return task.model
