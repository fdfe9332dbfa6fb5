"""Inference benchmark (dense vs upcycled MoE) and the inference-aware cost report.

Modules: `inference` (latency vs throughput with HF `generate` or vLLM), `cost` (joins the study's
results.json with inference.json into a CPT-vs-upcycling decision), `plots` (Matplotlib, Agg),
`outputs` (all-or-nothing file sets, strict JSON), `cli` (the `bench-inference` and `cost` subcommands).
Nothing here imports llmfoundry or composer; `cost` and `outputs` do not import torch either.
"""
