"""torch.hub entry points: one per registered model; pretrained=True loads bundled weights.

    model = torch.hub.load("path/to/nin", "nin_compact", source="local", pretrained=True)

Works from a plain checkout: the package is imported from src/ when nin is not installed.
"""

import sys as _sys
from pathlib import Path as _Path

dependencies = ["torch", "safetensors"]

_SRC = str(_Path(__file__).resolve().parent / "src")
if _SRC not in _sys.path:
    _sys.path.insert(0, _SRC)

from nin.config import check_model as _check_model  # noqa: E402 (needs src/ on the path first)
from nin.errors import NinError as _NinError  # noqa: E402
from nin.models import create_model as _create_model  # noqa: E402
from nin.models import list_models as _list_models  # noqa: E402
from nin.models import model_info as _model_info  # noqa: E402
from nin.pretrained import PRETRAINED as _PRETRAINED  # noqa: E402
from nin.pretrained import load_pretrained as _load_pretrained  # noqa: E402
from nin.pretrained import pretrained_for as _pretrained_for  # noqa: E402


def _entry_point(name: str):
    """The torch.hub entry point of registry model `name`."""

    def entry(pretrained: bool = False, **kwargs):
        """Build the model; `pretrained=True` loads the weights bundled with nin, if any."""
        bundled = _pretrained_for(name) if pretrained else None
        if pretrained and bundled is None:
            have = ", ".join(f"{n} ({_PRETRAINED[n][1]})" for n in sorted(_PRETRAINED))
            raise _NinError(
                f"no pretrained weights ship for {name}; pretrained=False builds it untrained "
                f"(bundled: {have})"
            )
        if bundled is None:  # checked as every model nin builds is: its kwargs, its cost
            sizes = {k: kwargs.pop(k) for k in ("num_classes", "in_channels") if k in kwargs}
            _check_model(name, kwargs, **sizes)
            return _create_model(name, **sizes, **kwargs)
        if kwargs:
            raise _NinError(
                f"pretrained=True fixes {name}'s architecture; drop the arguments "
                f"{', '.join(sorted(kwargs))} or use pretrained=False"
            )
        model, _ = _load_pretrained(bundled)
        return model.eval()

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"{_model_info(name).description}. pretrained=True: the bundled weights, where they "
        "exist; other keyword arguments go to nin.create_model."
    )
    return entry


# torch.hub finds entry points as module-level callables: one per registry model.
for _name in _list_models():
    globals()[_name] = _entry_point(_name)
