"""Party methods (synthesizers and baselines) and their registry; see ``fedpsg.methods.base``."""

from fedpsg.methods.base import (
    PLUGINS_ENV,
    PROFILES,
    RELEASES,
    Method,
    PartyStage,
    Release,
    get_method,
    method_names,
    register_method,
)
from fedpsg.methods.dpdm import DPDM
from fedpsg.methods.dpmerf import DPMerf
from fedpsg.methods.dpsgd import DPSGD
from fedpsg.methods.gswgan import GSWGAN
from fedpsg.methods.psg import PSG

for _method in (PSG(), DPSGD(), DPMerf(), DPDM(), GSWGAN()):  # one entry per built-in method
    register_method(_method)

__all__ = [
    "PLUGINS_ENV",
    "PROFILES",
    "RELEASES",
    "Method",
    "PartyStage",
    "Release",
    "get_method",
    "method_names",
    "register_method",
]
