"""Distillation methods: one package or module per method, one registry (:mod:`.registry`).

Built-in parts, registered in this order (the order of guidance parts in combined names): ``random``, ``herding``,
``recon``, ``dit`` (:mod:`.baselines`), ``mgd3`` (:mod:`.mgd3`), ``igd`` (:mod:`.igd`), ``minimax`` (:mod:`.minimax`).
A user's own part is a module that calls :func:`register` (docs/METHODS.md, "Adding a method"), loaded with
``--plugin`` / ``plugins:`` in a config.
"""

from raydistill.methods.baselines import DIT, HERDING, RANDOM, RECON
from raydistill.methods.igd import IGD
from raydistill.methods.mgd3 import MGD3
from raydistill.methods.minimax import MINIMAX
from raydistill.methods.registry import (
    MAX_IPC,
    Method,
    MethodContext,
    MethodSpec,
    check_extra,
    choice,
    flag,
    get_method,
    integer,
    load_plugins,
    method_names,
    methods_help,
    methods_markdown,
    number,
    parse_params,
    parts,
    register,
    value,
)

for _part in (RANDOM, HERDING, RECON, DIT, MGD3, IGD, MINIMAX):  # this order is the order of parts in combined names
    register(_part)

__all__ = ["MAX_IPC", "Method", "MethodContext", "MethodSpec", "check_extra", "choice", "flag", "get_method",
           "integer", "load_plugins", "method_names", "methods_help", "methods_markdown", "number", "parse_params",
           "parts", "register", "value"]
