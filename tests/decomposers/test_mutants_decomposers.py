"""Tests written to kill surviving mutants of fxdecomp/decomposers (tools/mutation/run.py decomposers).

The fitted (calibration-data) paths are covered by test_fitted_methods.py and test_tiling.py, which the
mutation run now selects too; what is left here checks documented behaviour the other tests do not.
"""

import pytest
from torch import nn

import fxdecomp
from fxdecomp.decomposers import get_decomposer
from fxdecomp.errors import InvalidInputError


@pytest.mark.parametrize("method, options", [("svd", "none"), ("tucker2", "none"), ("cp", "['max_iter', 'tol', 'seed', 'planning_iters']")])
def test_an_unknown_option_names_the_options_the_method_takes(method, options):
    # The fix the message offers: the method's own options, or 'none' for a method without any.
    with pytest.raises(InvalidInputError) as caught:
        get_decomposer("conv2d", method, rank_hint=3)
    assert str(caught.value) == f"method {method!r} takes no option(s) ['rank_hint']; its options are {options}"
    with pytest.raises(InvalidInputError, match=r"its options are none$"):
        fxdecomp.decompose_layer(nn.Conv2d(4, 4, 3), "spatial_svd", 0.5, rank_hint=3)
