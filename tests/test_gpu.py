"""MegaBlocks (`mb_dmoe`, grouped GEMM) against foundry's `torch_dmoe`, through `mpt_upcycle_causal_lm`, in bf16.

The experts are perturbed copies (expert_noise_std 0.5) and the router is strong (std 0.5), so which expert a
token goes to changes the output: a dispatch or expert-index bug shows up as a large logit difference, unlike on
identical experts where routing is irrelevant and the router gradient is pure rounding noise.

Tolerances (relative L2 norm of the difference; max over parameters for grad and param): bf16 has unit roundoff
u = 2^-9 ~ 2e-3, and two bf16 implementations that accumulate in different orders differ by a few u per matmul,
compounding over layers. TOL sits above the spread between the same torch_dmoe model under bf16 autocast and in
fp32 on CPU (the CPU proxy) and at least 3x below what a real dispatch bug does (experts 0 and 1 swapped, the
negative control): `test_tolerances_cpu_proxy` asserts both, and docs/benchmarks.md ("GPU check") has the numbers.
On the GPU, `scripts/device_check.sh` records the measured mb_dmoe vs torch_dmoe differences.

GPU tests: `.venv/bin/python -m pytest -q -m gpu tests/test_gpu.py -s`.
"""
from __future__ import annotations

import pytest
import torch

from conftest import record_result
from foundry_upcycle.config import UpcycleConfig, moe_ffn_config
from foundry_upcycle.moe_backend import megablocks_unavailable_reason
from foundry_upcycle.upcycle import upcycle_state_dict

_REASON = megablocks_unavailable_reason()

DENSE = {'d_model': 256, 'n_heads': 4, 'n_layers': 2, 'max_seq_len': 128, 'vocab_size': 512, 'no_bias': True,
         'expansion_ratio': 2.5, 'norm_type': 'rmsnorm', 'tie_word_embeddings': False, 'learned_pos_emb': False,
         'attn_config': {'attn_impl': 'torch', 'attn_type': 'grouped_query_attention', 'kv_n_heads': 2, 'rope': True,
                         'rope_impl': 'hf'},
         'ffn_config': {'ffn_type': 'mptglu', 'ffn_act_fn': {'name': 'silu'}}, 'loss_fn': 'torch_crossentropy'}
UCFG = UpcycleConfig(num_experts=8, top_k=2, load_balancing_loss_weight=0.01)
# The numbers behind these: docs/benchmarks.md, "GPU check" (CPU proxy, negative control, GPU when measured).
TOL = {'logits': 0.12, 'loss': 5e-4, 'lbl': 2e-3, 'grad': 0.36, 'param': 5e-2}
CONTROL_MARGIN = 3  # the negative control must exceed every tolerance by this factor


def upcycled_state_dict() -> dict[str, torch.Tensor]:
    from llmfoundry.models.mpt import ComposerMPTCausalLM
    torch.manual_seed(0)
    dense = ComposerMPTCausalLM(**DENSE)
    return upcycle_state_dict(dense.state_dict(), UCFG.num_experts, router_init_std=0.5, seed=0,
                              expert_noise_std=0.5)


def build(backend: str, state_dict, device: str, block: UpcycleConfig = UCFG):
    """mpt_upcycle_causal_lm as the upcycle block configures it (fp32 params; bf16 comes from autocast)."""
    from foundry_upcycle.model import ComposerMPTUpcycleCausalLM
    from foundry_upcycle.transforms import upcycled_model_config
    cfg = upcycled_model_config({'name': 'mpt_causal_lm', **DENSE}, block, backend)
    cfg.pop('name')
    model = ComposerMPTUpcycleCausalLM(**cfg, init_device=device)
    model.load_state_dict({k: v.to(device) for k, v in state_dict.items()}, strict=True)
    return model.train()


def step(model, ids: torch.Tensor, dtype: torch.dtype):
    """Forward, losses, backward and one AdamW step; returns what the comparison needs."""
    batch = {'input_ids': ids, 'labels': ids}
    with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(batch)
        losses = model.loss(out, batch)
    losses['total'].backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0).step()
    return {'logits': out.logits.detach().float(), 'loss': losses['loss'].detach().float(),
            'lbl': losses['lbl'].detach().float(), 'grad': grads,
            'param': {n: p.detach().float().clone() for n, p in model.named_parameters()}}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def differences(a: dict, b: dict) -> dict[str, float]:
    """Relative differences of a against the reference b (max over parameters for grad and param)."""
    return {
        'logits': _rel(a['logits'], b['logits']),
        'loss': _rel(a['loss'], b['loss']),
        'lbl': _rel(a['lbl'], b['lbl']),
        'grad': max(_rel(a['grad'][n], b['grad'][n]) for n in b['grad']),
        'param': max(_rel(a['param'][n], b['param'][n]) for n in b['param']),
    }


def swap_experts(state_dict, i: int, j: int) -> dict[str, torch.Tensor]:
    """An expert-index bug: experts i and j of every layer trade weights (the router is unchanged)."""
    f = int(DENSE['d_model'] * DENSE['expansion_ratio'])
    out = dict(state_dict)
    for k, v in state_dict.items():
        if '.experts.mlp.' in k:
            w = v.clone().view(UCFG.num_experts, f, -1)
            w[[i, j]] = w[[j, i]]
            out[k] = w.view_as(v)
    return out


def _ids(device: str) -> torch.Tensor:
    return torch.randint(0, DENSE['vocab_size'], (4, 128), generator=torch.Generator().manual_seed(0)).to(device)


def test_tolerances_cpu_proxy():
    """bf16-autocast vs fp32 torch_dmoe on CPU stays inside TOL; an expert swap does not."""
    sd = upcycled_state_dict()
    ref = step(build('torch', sd, 'cpu'), _ids('cpu'), torch.float32)
    bf16 = differences(step(build('torch', sd, 'cpu'), _ids('cpu'), torch.bfloat16), ref)
    swapped = differences(step(build('torch', swap_experts(sd, 0, 1), 'cpu'), _ids('cpu'), torch.float32), ref)
    print(f'\nCPU proxy, torch_dmoe bf16 autocast vs fp32: {bf16}\nexperts 0 and 1 swapped (fp32): {swapped}')
    record_result('cpu_proxy', {'bf16_vs_fp32': bf16, 'experts_swapped': swapped, 'tolerances': TOL})
    for key, tol in TOL.items():
        assert bf16[key] < tol, (key, bf16[key], tol)
        # the comparison catches a dispatch / expert-index bug on every quantity, with room to spare
        assert swapped[key] > CONTROL_MARGIN * tol, (key, swapped[key], tol)


@pytest.mark.gpu
@pytest.mark.skipif(_REASON is not None, reason=f'needs CUDA + megablocks: {_REASON}')
def test_mb_dmoe_matches_torch_dmoe_forward_backward_lbl_step():
    sd = upcycled_state_dict()
    ref = step(build('torch', sd, 'cuda'), _ids('cuda'), torch.bfloat16)
    mb = step(build('megablocks', sd, 'cuda'), _ids('cuda'), torch.bfloat16)
    diff = differences(mb, ref)
    print(f'\nmb_dmoe vs torch_dmoe (bf16 autocast, GPU): {diff}')
    record_result('gpu_mb_dmoe_vs_torch_dmoe', {'differences': diff, 'tolerances': TOL,
                                                'gpu': torch.cuda.get_device_name()})
    for key, tol in TOL.items():
        assert diff[key] < tol, (key, diff[key], tol)
