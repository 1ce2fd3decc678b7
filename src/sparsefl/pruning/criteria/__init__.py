"""The registered pruning criteria (importing this package fills ``CRITERIA``).

One module per criterion family; each class's docstring cites its paper, states its defaults
and every departure from the reference.
"""

from sparsefl.pruning.criteria import (  # noqa: F401  (register)
    grasp,
    magnitude,
    prospr,
    rd,
    skeletonization,
    snip,
    synflow,
)
