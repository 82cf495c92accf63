"""Deprecated alias of :mod:`uda` (the reference pipeline's package was ``gta2cs`` until 0.1.0.dev0; it serves
every benchmark now). ``import gta2cs.data`` and friends still work for one release and warn; import ``uda``.
The table of what moved where is in CHANGELOG.md."""

import importlib
import pkgutil
import sys
import warnings

import uda

warnings.warn("the package 'gta2cs' is now 'uda' (examples/uda/); 'gta2cs' is an alias kept for one release",
              DeprecationWarning, stacklevel=2)
for _info in pkgutil.walk_packages(uda.__path__, "uda."):
    _module = importlib.import_module(_info.name)
    sys.modules["gta2cs" + _info.name[len("uda"):]] = _module
    if "." not in _info.name[len("uda."):]:
        globals()[_info.name[len("uda."):]] = _module
