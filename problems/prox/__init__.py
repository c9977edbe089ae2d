"""Learned image-restoration priors through implicit fixed points.

- :class:`ProxRestoration`: ``x*(theta) = argmin 1/2 ||k * x - y||^2 + sum_j exp(theta_j) huber(d_j * x)``,
  differentiated through its optimality condition (:func:`bilevel.hypergradient`), the proximal-gradient
  fixed point and the ADMM fixed point (:func:`bilevel.implicit_fixed_point`), or unrolled.
- Data: :func:`load_images` (MNIST digits from the shared data, or generated piecewise-constant shapes).
- Command line: ``bilevel prox`` (:mod:`.cli`).
"""

from .data import DATASETS, Images, load_images
from .operators import FILTER_BANKS, filter_bank, gaussian_kernel
from .problem import FORWARD, ProxRestoration, Theta

__all__ = ["DATASETS", "FILTER_BANKS", "FORWARD", "Images", "ProxRestoration", "Theta", "filter_bank",
           "gaussian_kernel", "load_images"]
