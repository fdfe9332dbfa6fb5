"""Serving defects 1 and 2: which vLLM computes an export or an import exactly (engines.json), decided by one set
of rules (export/targets.py) for `export` and `import-hf` alike, from vLLM's own source:
- dynamic-NTK rope: vLLM scales the base once for the whole extended length, transformers only beyond
  max_position_embeddings: never exact on vLLM (Llama/Mistral exports and Mixtral imports alike);
- rope scaling on Mixtral: ignored by vLLM up to 0.11, passed through (`rope_parameters`) from 0.12: decided by the
  installed vLLM, or the versions the user names (--vllm-versions / $FOUNDRY_UPCYCLE_VLLM_VERSIONS).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from foundry_upcycle.export.hf_export import export_state_dict
from foundry_upcycle.export.hf_import import import_hf_to_mixtral
from foundry_upcycle.export.targets import VLLM_VERSIONS_ENV, vllm_versions
from test_export import MOE_FFN, build, foundry, mpt_cfg  # noqa: F401 (foundry: a fixture)
from test_import import save_dense

STUBS = Path(__file__).parent / 'stubs'
LINEAR = {'rope_type': 'linear', 'factor': 2.0}
DYNAMIC = {'rope_type': 'dynamic', 'factor': 2.0}


def _engines(out) -> dict:
    return json.loads((Path(out) / 'engines.json').read_text())


def _export(foundry, tmp_path, rope, target, **kw):  # noqa: F811
    cfg = mpt_cfg(ffn=MOE_FFN if target == 'mixtral' else mpt_cfg()['ffn_config'],
                  attn={'rope_hf_config': {'type': rope['rope_type'], 'factor': rope['factor']}})
    return export_state_dict(build(foundry, cfg).state_dict(), cfg, tmp_path / f'hf-{target}', target=target,
                             progress=False, **kw)


def _import(tmp_path, rope, **kw):
    src = tmp_path / 'dense'
    if not src.exists():
        save_dense(src, rope_scaling=rope)
    return import_hf_to_mixtral(src, tmp_path / 'moe', num_experts=4, top_k=2, progress=False, **kw).path


def test_dynamic_rope_is_flagged_for_vllm_by_export_and_import(foundry, tmp_path, monkeypatch):  # noqa: F811
    """Defect 1: a dynamic-NTK export was written as exact on vLLM."""
    monkeypatch.setenv(VLLM_VERSIONS_ENV, '0.12')  # even where vLLM passes Mixtral's rope scaling through
    with pytest.raises(ValueError, match=r"model\.attn_config\.rope_hf_config: 'dynamic' \(dynamic NTK\)"):
        _export(foundry, tmp_path, DYNAMIC, 'llama')
    assert not (tmp_path / 'hf-llama').exists()
    engines = _engines(_export(foundry, tmp_path, DYNAMIC, 'llama', allow_inexact_engines=True))
    assert engines['exact_on'] == ['transformers']
    assert 'dynamic' in engines['not_exact_on']['vllm']['attn_config.rope_hf_config']
    with pytest.raises(ValueError, match=r"rope_scaling: 'dynamic' \(dynamic NTK\)"):
        _import(tmp_path, DYNAMIC)
    assert not (tmp_path / 'moe').exists()
    assert _engines(_import(tmp_path, DYNAMIC, allow_inexact_engines=True))['exact_on'] == ['transformers']


@pytest.mark.parametrize('versions,exact', [('0.11.0', False), ('0.10,0.13', False), ('0.12.0', True),
                                            ('0.12,0.20', True)])
def test_mixtral_rope_scaling_decided_by_vllm_version_export_and_import_agree(foundry, tmp_path, monkeypatch,  # noqa: F811
                                                                              versions, exact):
    """Defect 2: a linear-scaled Mixtral was refused by export whatever vLLM serves it, and import-hf only warned."""
    monkeypatch.setenv(VLLM_VERSIONS_ENV, versions)
    for name, run in (('export', lambda **kw: _export(foundry, tmp_path, LINEAR, 'mixtral', **kw)),
                      ('import', lambda **kw: _import(tmp_path, LINEAR, **kw))):
        if exact:
            engines = _engines(run())
            assert engines['exact_on'] == ['transformers', 'vllm'], (name, engines)
        else:
            with pytest.raises(ValueError, match=r"vLLM's Mixtral ignores rope_scaling before 0\.12\.0"):
                run()
            engines = _engines(run(allow_inexact_engines=True))
            assert engines['exact_on'] == ['transformers'], (name, engines)
        assert engines['vllm_versions'].startswith('>= ' + versions.split(',')[0]), engines


def test_installed_vllm_decides_when_no_versions_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv(VLLM_VERSIONS_ENV, raising=False)
    sys.modules.pop('vllm', None)
    try:
        assert vllm_versions() == ('0.10.0', '1.0.0')  # none installed: every supported version must be exact
        monkeypatch.syspath_prepend(str(STUBS))
        monkeypatch.setenv('VLLM_STUB_VERSION', '0.12.0')
        assert vllm_versions() == ('0.12.0', None)
        assert _engines(_import(tmp_path, LINEAR))['exact_on'] == ['transformers', 'vllm']
    finally:
        sys.modules.pop('vllm', None)
    with pytest.raises(ValueError, match="vllm versions must be 'LOW' or 'LOW,HIGH'"):
        vllm_versions('0.13,0.12')
