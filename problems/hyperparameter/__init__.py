"""Hyperparameter optimization by implicit differentiation.

- :class:`PerFeatureL2`: one L2 penalty per feature of logistic / softmax regression.
- :class:`HyperCleaning`: one weight per training example, learned from clean validation data.
- :class:`HOAG`: the outer loop (tightening tolerances, warm starts, step back-off).
- Data: :func:`load_mnist` (sha256-checked, optional download), :func:`load_tabular`
  (Adult, Bank Marketing, COMPAS, German Credit; scikit-learn's bundled sets when installed),
  :func:`split` and :func:`mnist_splits`.
- Command line: ``bilevel hyperopt {l2,cleaning}`` (:mod:`.cli`).
"""

from .cleaning import HyperCleaning, corrupt_labels, separation
from .l2 import PerFeatureL2
from .mnist import MNIST, load_mnist
from .outer import HOAG, HOAGState, StepInfo
from .splits import Splits, mnist_splits, split
from .tabular import Tabular, load_tabular

__all__ = ["HOAG", "HOAGState", "HyperCleaning", "MNIST", "PerFeatureL2", "Splits", "StepInfo", "Tabular",
           "corrupt_labels", "load_mnist", "load_tabular", "mnist_splits", "separation", "split"]
