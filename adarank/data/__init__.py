"""Datamodules: text classification (files or built-in corpora), causal LM, instruction SFT,
planted task."""

from adarank.data.causal_lm import CausalLMDataModule
from adarank.data.classification import TextClassificationDataModule
from adarank.data.files import check_table, read_columns, read_header, table_format
from adarank.data.planted import PlantedDataModule
from adarank.data.resumable import ResumableDataLoader
from adarank.data.rotten_tomatoes import corpus_path, load_rotten_tomatoes
from adarank.data.sft import SFTDataModule

__all__ = [
    "CausalLMDataModule",
    "PlantedDataModule",
    "ResumableDataLoader",
    "SFTDataModule",
    "TextClassificationDataModule",
    "check_table",
    "corpus_path",
    "load_rotten_tomatoes",
    "read_columns",
    "read_header",
    "table_format",
]
