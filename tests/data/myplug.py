"""A tiny kdcache plugin, outside kdcache: a teacher, a dataset, a student and a loss (tests/test_plugins.py copies it into a temporary directory on sys.path as the package myplug)."""
__version__ = "0.3.1"
import numpy as np
from torch import nn
from pipeline.plugins import declare
from pipeline.students import Student


def tiny(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(1), nn.Linear(int(np.prod(input_shape)), 32), nn.ReLU(),
                         nn.Linear(32, num_classes))


def blobs(arg, cfg):
    from pipeline.data import ArraySource, Dataset
    n = int(arg or 400)
    rng = np.random.default_rng(7)
    y = np.arange(n) % 4
    x = (rng.normal(0, 1, (n, 12)) + 2.0 * np.eye(4, 12)[y]).astype(np.float32)
    pools = {"train": ArraySource(x[:-100], y[:-100], np.arange(n - 100)),
             "test": ArraySource(x[-100:], y[-100:], np.arange(n - 100, n))}
    return Dataset(f"myplug:blobs:{n}", pools, (12,), 4, cfg)


@declare(kind="features")
class Ridge(Student):
    """scikit-learn's RidgeClassifier on the cached features (its own student class)."""
    has_proba = False

    def __init__(self, seed=0, C="1.0"):
        self.seed = seed
        self.C = C

    def fit_cache(self, data):
        from sklearn.linear_model import RidgeClassifier

        self.model_ = RidgeClassifier(alpha=1.0 / float(self.C)).fit(data.features("train"), data.labels("train"))
        self.classes_ = self.model_.classes_
        return self

    def decision_function(self, X):
        return self.model_.decision_function(np.asarray(X[0:len(X)]))

    @property
    def n_params_(self):
        return int(self.model_.coef_.size + self.model_.intercept_.size)

    def tensors(self):
        return {"coef": self.model_.coef_, "intercept": self.model_.intercept_}


@declare(logits=True, temperature=True)
def soft_ce(z_s, y, *, p_t=None, T=4.0, alpha=0.5, **_):
    ce = nn.functional.cross_entropy(z_s, y)
    kd = -(p_t * nn.functional.log_softmax(z_s / T, 1)).sum(1).mean() * T * T
    return (1 - alpha) * ce + alpha * kd


class _Branchy(nn.Module):
    """Control flow on the data: torch.fx cannot trace it, so no layer can be tapped."""

    def __init__(self, d, num_classes):
        super().__init__()
        self.a, self.b = nn.Linear(d, num_classes), nn.Linear(d, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.a(x) if float(x.sum()) > 0 else self.b(x)


def branchy(input_shape, num_classes):
    return _Branchy(int(np.prod(input_shape)), num_classes)
