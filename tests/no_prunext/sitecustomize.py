"""Put this folder on PYTHONPATH and prunext cannot be imported: a process like one where it was never installed.

Python runs ``sitecustomize`` at start-up; the finder below comes first on
``sys.meta_path``, so it answers before the installed package's own finder.
The tests run transformers' and lm-eval's loaders this way to show a native
folder loads from the code it carries.
"""

import importlib.abc
import sys


class NoPrunext(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "prunext" or name.startswith("prunext."):
            raise ModuleNotFoundError(f"No module named {name!r} (prunext is blocked in this process)", name=name)
        return None


sys.meta_path.insert(0, NoPrunext())
