"""Stage cache keys: a stage finished by another package version, or with other recipe-file bytes, is redone."""
from __future__ import annotations

from pathlib import Path

from foundry_upcycle.study.stages import Progress, Stages, code_salt


def test_salt_changes_with_the_recipe_bytes_and_the_package(tmp_path, monkeypatch):
    recipe = tmp_path / 'cpt.yaml'
    recipe.write_text('lr: 1.0e-3\n')
    salt = code_salt({'cpt': recipe})
    assert set(salt) == {'package', 'recipes'} and salt['package'] and set(salt['recipes']) == {'cpt'}
    runs = []
    stages = Stages(tmp_path / 'out', Progress(False), salt)
    stages.run('s', {'x': 1}, lambda work: runs.append(1) or {'v': 1}, what='s')
    assert Stages(tmp_path / 'out', Progress(False), salt).done('s', {'x': 1})          # same code: reused
    recipe.write_text('lr: 1.0e-3  # a comment\n')
    edited = code_salt({'cpt': recipe})
    assert edited != salt and not Stages(tmp_path / 'out', Progress(False), edited).done('s', {'x': 1})
    import importlib.metadata
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, 'version', lambda name: '9.9.9' if name == 'foundry-upcycle' else real(name))
    upgraded = code_salt({'cpt': recipe})
    assert upgraded['package'] == '9.9.9' and not Stages(tmp_path / 'out', Progress(False), upgraded).done('s', {'x': 1})
    assert str(tmp_path) not in str(salt)                          # where the recipes live is not part of it
