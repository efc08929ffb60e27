"""The BN strategy choice (qtool.bn_strategy's modes), torch-free so that configs validate it without
importing torch."""
from __future__ import annotations

from qtool.errors import QtoolError

__all__ = ["BN_MODES", "SUPPORTED", "DEFAULT", "check_bn", "resolve_bn"]

BN_MODES = ("fold", "unfold", "renorm")
SUPPORTED = {"qat": ("unfold", "fold"), "supernet": ("renorm",), "dynamic": ("fold",)}
DEFAULT = {"qat": "unfold", "supernet": "renorm", "dynamic": "fold"}


def check_bn(mode: str, trainer: str, option: str = "bn") -> str:
    """`mode` if `trainer` supports it, else a QtoolError naming `option`."""
    if mode not in SUPPORTED[trainer]:
        raise QtoolError(f"{option} must be one of {', '.join(SUPPORTED[trainer])} for {trainer}, got {mode!r}")
    return mode


def resolve_bn(trainer: str, requested: str | None = None, *, unfused_available: bool = True) -> str:
    """The BN mode `trainer` runs with: `requested` (default `DEFAULT[trainer]`), "unfold" becoming
    "fold" when there is no unfused model to take the BatchNormalizations from."""
    mode = check_bn(DEFAULT[trainer] if requested is None else requested, trainer)
    return "fold" if mode == "unfold" and not unfused_available else mode
