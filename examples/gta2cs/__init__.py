"""Deprecated alias of :mod:`uda`: the reference pipeline's package was ``gta2cs``; it serves every benchmark now.

``import gta2cs`` and ``gta2cs.<module>`` for every module that exists in ``uda`` (``gta2cs.run``,
``gta2cs.classes``, ...) keep working for one release, with a ``DeprecationWarning``. The modules that were split
(``data``, ``layouts``, ``synthetic``, ``layout_demo``, ``predict``) have no alias: CHANGELOG.md has the table of
what moved where."""

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
