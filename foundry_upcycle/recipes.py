"""Loading foundry YAML recipes the way `llmfoundry train` does (OmegaConf + dotlist overrides)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

REPO_YAMLS = Path(__file__).resolve().parents[1] / 'yamls'


def load_recipe(path: str, overrides: Optional[Sequence[str]] = None, resolve: bool = True) -> dict[str, Any]:
    import yaml
    from omegaconf import OmegaConf as om
    from omegaconf.errors import OmegaConfBaseException
    p = Path(path)
    if not p.is_file():
        raise ValueError(f'recipe {path} does not exist')
    try:
        cfg = om.load(p)
        if overrides:
            cfg = om.merge(cfg, om.from_cli(list(overrides)))
        return om.to_container(cfg, resolve=resolve)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ValueError(f'recipe {path} is not a readable YAML recipe: {e}') from None


def dump_yaml(cfg: dict[str, Any]) -> str:
    from omegaconf import OmegaConf as om
    return om.to_yaml(om.create(cfg))
