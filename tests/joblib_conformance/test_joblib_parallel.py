"""joblib's own ``joblib.test.test_parallel``, with "azurebatch" in its backend lists.

conftest.py registered the conformance backend before this import; the lists are extended
in place, so that the parametrizations joblib declared on them pick "azurebatch" up when
pytest generates the tests from this module.
"""

from azurebatch_conformance import BACKEND, restore
from joblib.test import test_parallel as _joblib_tests

for _name in ("PARALLEL_BACKENDS", "PROCESS_BACKENDS"):
    _backends = getattr(_joblib_tests, _name)
    if BACKEND not in _backends:
        _backends.append(BACKEND)

from joblib.test.test_parallel import *  # noqa: E402, F403

restore()
