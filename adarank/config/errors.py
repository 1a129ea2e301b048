"""The one exception type of the config layer."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config problem; ``problems`` lists every ``key: value → expected`` message found.

    The CLI turns it into exit code 2. It subclasses ``ValueError`` so library callers can
    catch it like any other invalid-argument error.
    """

    def __init__(self, message: str | list[str]) -> None:
        self.problems = [message] if isinstance(message, str) else list(message)
        text = (
            self.problems[0]
            if len(self.problems) == 1
            else "\n".join(f"  - {p}" for p in self.problems)
        )
        if len(self.problems) > 1:
            text = f"{len(self.problems)} problems in the config:\n{text}"
        super().__init__(text)
