"""Inference benchmark (dense vs upcycled MoE) and the inference-aware cost report.

Modules: `inference` (configuration, runs the models), `models` (the HF directories served, one per top-k;
synthetic ones via import-hf), `engines` (vLLM async engine, continuous batching, one per process; HF `generate`,
the CPU fallback), `modes` (offline batches, Poisson rate sweeps, what is measured), `worker` (one model with one
engine, in its own process for vLLM), `outputs` (inference.json, the table, strict JSON), `plots` (Matplotlib,
Agg), `cost` (joins the study's results.json with inference.json into a CPT-vs-upcycling decision), `cli` (the
`bench-inference` and `cost` subcommands). Nothing here imports llmfoundry or composer; `cost` and `outputs` do not
import torch either.
"""
