"""Hugging Face export (MPT -> Llama / Mistral / Mixtral / DBRX) and import (dense Llama / Mistral -> Mixtral).

Modules: `hf_export` (MPT checkpoint + recipe -> HF dir), `hf_import` (streaming dense HF -> Mixtral upcycling),
`writer` (atomic output dirs, streaming safetensors shards), `callback` (`HFExportCheckpointer`, a Composer
callback), `cli` (the `export` and `import-hf` subcommands). This package file imports nothing heavy.
"""
