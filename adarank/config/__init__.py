"""Config layer: compose recipes from fragments, override, validate, instantiate.

See ``docs/recipes.md`` for the file layout and every key.
"""

from adarank.config.errors import ConfigError
from adarank.config.instantiate import check_arguments, get_component, instantiate
from adarank.config.loader import (
    configs_dir,
    list_recipes,
    load_config,
    parse_overrides,
    recipes_dir,
    resolve_recipe,
)
from adarank.config.validate import validate_config

__all__ = [
    "ConfigError",
    "check_arguments",
    "configs_dir",
    "get_component",
    "instantiate",
    "list_recipes",
    "load_config",
    "parse_overrides",
    "recipes_dir",
    "resolve_recipe",
    "validate_config",
]
