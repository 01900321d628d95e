"""Import hook that lets PyPI's CUDA torchvision import beside a CPU-only torch build.

torchvision's compiled library cannot load next to a CPU torch; its meta registrations then refer to the
operators ``torchvision::nms`` and ``torchvision::qnms``, which do not exist, and ``import torchvision`` (hence
timm, lightning, torchmetrics, ptflops) fails. Before torchvision's first import we define those two schemas,
and only when torch is a CPU build and the compiled library really fails to load; everywhere else nothing happens.

The ``.pth`` file imports this module in every interpreter of the environment, so importing it must cost nothing
measurable: it imports nothing beyond ``sys`` and adds one finder that compares module names until torchvision is
imported (or forever, in a program that never imports it). The work happens only at torchvision's first import.
"""

import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_keep: list = []  # torch.library.Library objects must stay alive for their definitions to persist


def _fix() -> None:
    import importlib.util
    from pathlib import Path

    import torch

    if torch.version.cuda is not None:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    libs = sorted(Path(spec.origin).parent.glob("_C*.so"))
    if not libs:
        return
    try:
        torch.ops.load_library(str(libs[0]))
        return  # the compiled library works: nothing to fix
    except (OSError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS.values():
        try:
            lib.define(schema)
        except RuntimeError:  # already defined by someone else
            pass
    _keep.append(lib)


class _Finder:
    """Runs the fix once, just before torchvision is imported, then steps aside (a meta path finder by protocol:
    subclassing importlib.abc.MetaPathFinder would import importlib.abc in every interpreter)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            try:
                _fix()
            except Exception:  # never break an import because of the fix itself
                pass
        return None


if not any(isinstance(f, _Finder) for f in sys.meta_path) and "torchvision" not in sys.modules:
    sys.meta_path.insert(0, _Finder())
