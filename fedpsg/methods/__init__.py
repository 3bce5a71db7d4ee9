"""Party methods (synthesizers and baselines) and their registry; see ``fedpsg.methods.base``."""

# Each built-in method registers itself (@register_method) when its module is imported.
from fedpsg.methods import dpac, dpdm, dpmepf, dpmerf, dpsgd, gswgan, psg
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

BUILT_IN = (psg, dpsgd, dpmerf, dpdm, gswgan, dpmepf, dpac)  # the modules of the built-in methods

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
