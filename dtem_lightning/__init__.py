"""Token merging (ToMe, DTEM-soft, DTEM-hard) for timm Vision Transformers, with Lightning experiments."""

from dtem_lightning.patch import apply_policy
from dtem_lightning.policy import ATM, DTEMHard, DTEMSoft, MergePolicy, NoMerge, PiToMe, ToFu, ToMe, ToMeSoft

__all__ = [
    "apply_policy",
    "MergePolicy",
    "NoMerge",
    "ToMe",
    "DTEMHard",
    "DTEMSoft",
    "ToMeSoft",
    "PiToMe",
    "ToFu",
    "ATM",
]
__version__ = "0.1.0"
