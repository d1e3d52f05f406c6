"""Every console script of pyproject.toml points at an importable entry point."""

import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXPECTED = {"sct-train", "sct-evaluate", "sct-predict", "sct-qa", "sct-export-dicom",
            "sct-export-model", "sct-ablate", "sct-bench", "sct-reproduce", "sct-dose"}


def _scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml (tomllib needs Python 3.11)."""
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, flags=re.M))


def test_console_scripts_resolve():
    scripts = _scripts()
    assert EXPECTED <= set(scripts)
    # sct_jax.cli.bench is the benchmark package's entry point (its own module).
    assert scripts["sct-bench"] == "sct_jax.cli.bench:main"
    for name, target in scripts.items():
        if name == "sct-bench":
            continue
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
