"""hubconf.py: torch.hub entry points for every registered model, bundled weights on request."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nin.errors import NinError
from nin.models import list_models
from nin.pretrained import load_pretrained

REPO = Path(__file__).resolve().parents[1]


def test_one_entry_point_per_model() -> None:
    """What torch.hub.list would show (it reads GitHub only): the module's public callables."""
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    names = [f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith("_")]
    assert names == list_models()
    assert hubconf.dependencies == ["torch", "safetensors"]
    assert "compact NiN" in hubconf.nin_compact.__doc__


def test_untrained_and_pretrained(capsys) -> None:
    net = torch.hub.load(str(REPO), "nin_d2l", source="local", num_classes=7, verbose=False)
    assert net(torch.zeros(1, 1, 224, 224)).shape == (1, 7)
    net = torch.hub.load(str(REPO), "nin_compact", source="local", pretrained=True, verbose=False)
    bundled, _ = load_pretrained("fashion-mnist")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(net(x), bundled.eval()(x))
    assert not net.training


def test_pretrained_errors_are_clear() -> None:
    with pytest.raises(NinError, match="no pretrained weights ship for nin_d2l"):
        torch.hub.load(str(REPO), "nin_d2l", source="local", pretrained=True, verbose=False)
    with pytest.raises(NinError, match="drop the arguments num_classes"):
        torch.hub.load(
            str(REPO), "nin_compact", source="local", pretrained=True, num_classes=3, verbose=False
        )
    # Checked as every model nin builds is, before it is built: its depth, then its cost.
    with pytest.raises(NinError, match="num_pointwise must be from 0 to 16, got 3000"):
        torch.hub.load(str(REPO), "nin_compact", source="local", num_pointwise=3000, verbose=False)
    with pytest.raises(NinError, match="parameters"):
        torch.hub.load(str(REPO), "nin_d2l", source="local", num_classes=10**6, verbose=False)


def test_works_without_nin_installed(tmp_path: Path) -> None:
    """A bare checkout (hubconf.py + src/) loads in a Python where `import nin` finds nothing."""
    checkout = tmp_path / "nin-checkout"
    checkout.mkdir()
    shutil.copy(REPO / "hubconf.py", checkout / "hubconf.py")
    shutil.copytree(REPO / "src", checkout / "src", ignore=shutil.ignore_patterns("__pycache__"))
    script = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path = [p for p in sys.path if not p.rstrip("/").endswith("src")]
        assert importlib.util.find_spec("nin") is None, "nin is still importable"
        import torch
        net = torch.hub.load({str(checkout)!r}, "nin_compact", source="local", pretrained=True)
        import nin
        assert nin.__file__.startswith({str(checkout)!r}), nin.__file__
        print(net(torch.zeros(1, 1, 28, 28)).shape)
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch.Size([1, 10])"
