"""Integrations with other training loops (the Hugging Face ``Trainer`` and TRL's trainers).

Nothing here imports Lightning. ``adarank.integrations.transformers`` imports ``transformers``;
import it explicitly::

    from adarank.integrations.transformers import AdaRankCallback
"""

__all__: list[str] = []
