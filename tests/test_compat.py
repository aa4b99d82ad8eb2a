"""clipft._compat: the old flat module paths still import for one release, warn once, and expose the
new module's names (the same objects)."""
import importlib
import subprocess
import sys
import warnings

import pytest

from clipft._compat import MOVED


def test_every_old_path_names_a_module_that_exists():
    for new in MOVED.values():
        assert importlib.util.find_spec(new) is not None, new


@pytest.mark.parametrize("old", ["clipft.api", "clipft.evaluate", "clipft.runfiles", "clipft.ablate"])
def test_old_path_warns_and_exposes_the_new_names(old):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(old)
    new = importlib.import_module(MOVED[old])
    assert any(issubclass(w.category, DeprecationWarning) and MOVED[old] in str(w.message) for w in caught)
    public = [k for k in vars(new) if not k.startswith("_")]
    assert public and all(getattr(mod, k) is getattr(new, k) for k in public)


def test_old_from_import_works_in_a_fresh_process():
    # What a user's script written against the flat layout does: no error, one DeprecationWarning.
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "try:\n    from clipft.api import load\nexcept DeprecationWarning as w:\n    print('warned:', w)\n"
            "warnings.simplefilter('ignore')\nfrom clipft.api import load\nimport clipft.inference as i\n"
            "assert load is i.load\nprint('same')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "warned: clipft.api has moved to clipft.inference" in out.stdout and "same" in out.stdout
