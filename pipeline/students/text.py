"""Students that read text: they train on the documents of a text cache (``text:PATH``,
``textdir:PATH``), against the labels or the teacher's cached logits.

- ``tfidf_logreg``, ``tfidf_svc`` (:class:`TfidfStudent`): scikit-learn linear models on
  TF-IDF word n-grams (``vectorizer=tfidf``, a vocabulary learnt on train) or on hashed word
  n-grams (``vectorizer=hashing``: no vocabulary, ``buckets`` columns), weighted by IDF either
  way. ``target=labels|teacher|soft``: soft fits the teacher's softmax at T the way
  ``logreg_soft`` does (:func:`pipeline.students.features.fit_soft_targets`).
- ``fasttext``, ``textcnn`` (:class:`TextNetStudent`): small torch networks on hashed n-gram
  ids (:mod:`pipeline.text_features`), trained with any loss on the cached logits (``kd``,
  ``dkd``, ...) like every torch student; feature losses compare the teacher's cached feature
  with the network's pooled text vector (``embed``).

The text processing is part of each student: its settings are hyperparameters, saved with the
run and exported with it (the vectoriser inside the skops Pipeline; the featuriser's spec beside
the ONNX model).
"""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import torch
from torch import nn

from pipeline import runtime, training
from pipeline.errors import KdError
from pipeline.latency import torch_predict
from pipeline.losses import LOSSES
from pipeline.numerics import softmax
from pipeline.rows import LazyRows, map_blocks
from pipeline.students.base import Student
from pipeline.students.data import StudentData
from pipeline.students.features import (C_GRID, fit_soft_targets, hard_targets,
                                        teacher_soft_targets)
from pipeline.students.networks import TorchStudent
from pipeline.students.registry import STUDENTS
from pipeline.text_features import HashedNgrams

# sklearn's word tokens, single characters kept (its default drops them): the same words
# pipeline.text_features reads
TOKEN_PATTERN = r"(?u)\b\w+\b"
VOCABULARY_SEPARATOR = "\n"  # terms hold no whitespace but the space between an n-gram's words


def documents(X) -> list[str]:
    """Rows of documents (a numpy array of str, or any sequence) as a list of str; anything
    else is refused (a text student was handed numbers)."""
    docs = list(X)
    if docs and not isinstance(docs[0], str):
        raise TypeError(f"a text student scores documents (str), not {type(docs[0]).__name__}")
    return docs


def _train_documents(data: StudentData, model: str) -> list[str]:
    """The train split's documents in cache row order (one view: text has no augmentation)."""
    if data.views != 1:
        raise KdError(f"model {model} reads each document once, and this run draws from "
                      f"{data.views} cached views; pass views=1")
    return documents(data.rows("train", "inputs")[0:data.num_rows("train")])


def _two_columns(scores: np.ndarray) -> np.ndarray:
    """scikit-learn's binary margin (one column, > 0 for classes_[1]) as two class scores."""
    return np.stack([-scores, scores], axis=1) if scores.ndim == 1 else scores


# =========================================================================== scikit-learn

class TfidfStudent(Student):
    """A linear model on IDF-weighted word n-grams of the raw documents.

    ``vectorizer``: ``tfidf`` (scikit-learn's TfidfVectorizer: a vocabulary of the train
    split's n-grams seen in at least ``min_df`` documents) or ``hashing`` (HashingVectorizer
    with ``buckets`` columns, then TfidfTransformer: no vocabulary to store, collisions
    instead). Both lowercase, read word tokens (``\\w+``) and n-grams of 1..``ngrams`` words,
    use sublinear tf (1 + log tf) and L2-normalise rows. ``estimator``: ``logreg``
    (LogisticRegression) or ``linear_svc`` (LinearSVC; margins, calibrated by the run on val).
    ``target``: ``labels``, ``teacher`` (its argmax) or ``soft`` (its softmax at
    ``temperature``, default the cache's: each row expanded once per class, weighted by the
    teacher's probability, as ``logreg_soft`` does; classes under ``min_prob`` dropped).
    ``C``: inverse regularisation, or ``auto``: chosen on val from ``C_GRID``.
    """

    fixed_params = ("estimator",)  # names the registry entry (tfidf_logreg, tfidf_svc)
    choices = {"target": ("labels", "teacher", "soft"), "vectorizer": ("tfidf", "hashing")}

    def __init__(self, estimator: str = "logreg", vectorizer: str = "tfidf", C: float | str = "auto",
                 target: str = "labels", temperature: float | None = None, ngrams: int = 2,
                 min_df: int = 1, buckets: int = 2 ** 18, max_iter: int = 5000,
                 min_prob: float = 1e-4, seed: int = 0):
        self.estimator = estimator
        self.vectorizer = vectorizer
        self.C = C
        self.target = target
        self.temperature = temperature
        self.ngrams = ngrams
        self.min_df = min_df
        self.buckets = buckets
        self.max_iter = max_iter
        self.min_prob = min_prob
        self.seed = seed

    # ------------------------------------------------------------------ the parts
    def _vectorizer(self, vocabulary: dict[str, int] | None = None):
        """The unfitted vectoriser (a TfidfVectorizer, or a Pipeline of HashingVectorizer and
        TfidfTransformer), ``vocabulary`` fixed when given (a saved student)."""
        from sklearn.feature_extraction.text import (HashingVectorizer, TfidfTransformer,
                                                     TfidfVectorizer)
        from sklearn.pipeline import Pipeline

        words = dict(lowercase=True, token_pattern=TOKEN_PATTERN, ngram_range=(1, int(self.ngrams)))
        if self.vectorizer == "tfidf":
            return TfidfVectorizer(**words, min_df=int(self.min_df), sublinear_tf=True,
                                   vocabulary=vocabulary, dtype=np.float32)
        if self.vectorizer == "hashing":
            # alternate_sign=False: counts stay counts, so IDF and sublinear tf mean what they do
            return Pipeline([("hashing", HashingVectorizer(**words, n_features=int(self.buckets),
                                                           alternate_sign=False, norm=None,
                                                           dtype=np.float32)),
                             ("idf", TfidfTransformer(sublinear_tf=True))])
        raise ValueError(f"vectorizer={self.vectorizer!r} must be tfidf or hashing")

    def _classifier(self, C: float):
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import LinearSVC

        if self.estimator == "logreg":
            return LogisticRegression(C=C, max_iter=self.max_iter, random_state=self.seed)
        if self.estimator == "linear_svc":
            return LinearSVC(C=C, max_iter=self.max_iter, random_state=self.seed)
        raise ValueError(f"unknown estimator {self.estimator!r}")

    def _idf(self):
        """The fitted IDF weighting (the TfidfVectorizer, or the hashing pipeline's step)."""
        return self.vectorizer_ if self.vectorizer == "tfidf" else self.vectorizer_.named_steps["idf"]

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y) -> "TfidfStudent":
        """Fit on documents ``X`` and targets ``y``: labels [N], or the teacher's soft targets
        [N, C] (a 2-D array: probabilities, fitted by the expansion). One C (``C=auto`` chooses
        on a validation split: use :meth:`fit_cache`)."""
        if self.C == "auto":
            raise ValueError("C='auto' chooses C on a validation split: use fit_cache")
        self.vectorizer_ = self._vectorizer()
        return self._fit_classifier(self.vectorizer_.fit_transform(documents(X)), y, float(self.C))

    def _fit_classifier(self, X, y, C: float) -> "TfidfStudent":
        y = y if isinstance(y, dict) else np.asarray(y)
        if isinstance(y, dict) or y.ndim == 2:
            self.model_ = fit_soft_targets(self._classifier(C), X, y, self.min_prob)
        else:
            self.model_ = self._classifier(C).fit(X, y)
        self.classes_ = self.model_.classes_
        return self

    def fit_cache(self, data: StudentData) -> "TfidfStudent":
        """Vectorise the train split's documents, fit the targets ``target`` names; with
        ``C=auto`` once per value of ``C_GRID``, keeping the first with the best validation
        accuracy (``C_``: the C used)."""
        model = "tfidf_logreg" if self.estimator == "logreg" else "tfidf_svc"
        if self.target == "soft":
            temperature = self.temperature if self.temperature is not None else data.temperature
            y = teacher_soft_targets(data, temperature, self.min_prob, model)
            self.temperature_ = temperature
        else:
            y = hard_targets(data, self.target)
        self.vectorizer_ = self._vectorizer()
        X = self.vectorizer_.fit_transform(_train_documents(data, model))
        X_val = self.vectorizer_.transform(documents(data.rows("val", "inputs")[0:data.num_rows("val")]))
        y_val = data.labels("val")
        best = None
        for c in (C_GRID if self.C == "auto" else (float(self.C),)):  # model selection on val
            candidate = copy.copy(self)._fit_classifier(X, y, c)
            acc = float(np.mean(candidate.classes_[_two_columns(
                candidate.model_.decision_function(X_val)).argmax(1)] == y_val))
            if best is None or acc > best[0]:
                best = (acc, candidate.model_, c)
        self.model_, self.C_ = best[1], best[2]
        self.classes_ = self.model_.classes_
        return self

    # ------------------------------------------------------------------ scoring
    def decision_function(self, X) -> np.ndarray:
        """Class scores [N, K] of documents ``X`` (an array of str or a
        :class:`~pipeline.rows.LazyRows` of them)."""
        return map_blocks(self._scores, X)

    def _scores(self, X) -> np.ndarray:
        return _two_columns(self.model_.decision_function(self.vectorizer_.transform(documents(X))))

    @property
    def has_proba(self) -> bool:
        return hasattr(self.model_, "predict_proba")

    def predict_proba(self, X) -> np.ndarray:
        return map_blocks(lambda b: self.model_.predict_proba(self.vectorizer_.transform(documents(b))), X)

    @property
    def n_params_(self) -> int:
        """The linear model's weights (the vocabulary and IDF weights are its featuriser)."""
        return int(self.model_.coef_.size + np.size(self.model_.intercept_))

    # ------------------------------------------------------------------ saving
    def tensors(self) -> dict[str, np.ndarray]:
        """The classifier's weights, the IDF weights and (``vectorizer=tfidf``) the vocabulary,
        as the UTF-8 bytes of its terms in column order, one per line (``vocabulary_utf8``)."""
        out = {"coef": self.model_.coef_, "intercept": np.atleast_1d(self.model_.intercept_),
               "classes": self.classes_, "idf": self._idf().idf_.astype(np.float64)}
        if self.vectorizer == "tfidf":
            terms = sorted(self.vectorizer_.vocabulary_, key=self.vectorizer_.vocabulary_.get)
            out["vocabulary_utf8"] = np.frombuffer(
                VOCABULARY_SEPARATOR.join(terms).encode("utf-8"), np.uint8).copy()
        return out

    def load_tensors(self, tensors: dict[str, np.ndarray], input_shape=None,
                     num_classes=None) -> "TfidfStudent":
        """The fitted vectoriser and classifier rebuilt from :meth:`tensors`."""
        vocabulary = None
        if self.vectorizer == "tfidf":
            terms = bytes(np.asarray(tensors["vocabulary_utf8"], np.uint8)).decode("utf-8")
            vocabulary = {t: i for i, t in enumerate(terms.split(VOCABULARY_SEPARATOR))}
        vectorizer = self._vectorizer(vocabulary)
        if self.vectorizer == "tfidf":
            vectorizer.idf_ = tensors["idf"]  # (the setter builds its fitted TfidfTransformer)
        else:
            idf = vectorizer.named_steps["idf"]
            idf.idf_ = tensors["idf"]
            idf.n_features_in_ = len(tensors["idf"])
        model = self._classifier(1.0)
        model.coef_, model.intercept_ = tensors["coef"], tensors["intercept"]
        model.classes_ = tensors["classes"]
        model.n_features_in_ = int(tensors["coef"].shape[1])
        self.vectorizer_, self.model_, self.classes_ = vectorizer, model, tensors["classes"]
        return self

    def to_sklearn(self):
        """The deployed student as one scikit-learn Pipeline: documents (str) in, the
        vectoriser's steps, then the classifier."""
        from sklearn.pipeline import Pipeline

        steps = (list(self.vectorizer_.steps) if self.vectorizer == "hashing"
                 else [("vectorizer", self.vectorizer_)])
        return Pipeline([*steps, ("classifier", self.model_)])


# =========================================================================== torch

class FastText(nn.Module):
    """fastText's classifier (Joulin et al., 2017): the mean of the embeddings of a document's
    hashed n-gram ids, then a linear layer. An embedding bag written as Embedding + masked
    mean, so that it exports to plain ONNX; id 0 is padding and never counts."""

    def __init__(self, buckets: int, width: int, num_classes: int):
        super().__init__()
        self.embedding = nn.Embedding(buckets + 1, width, padding_idx=0)
        nn.init.uniform_(self.embedding.weight, -1.0 / width, 1.0 / width)  # fastText's init
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        self.classifier = nn.Linear(width, num_classes)
        self.dim = width

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """The document vector [B, width]: the mean embedding of the ids that are not padding
        (zeros for a document without any)."""
        mask = (ids > 0).unsqueeze(-1)
        summed = (self.embedding(ids) * mask).sum(1)
        return summed / mask.sum(1).clamp(min=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(ids))


class TextCNN(nn.Module):
    """Kim's (2014) convolutional sentence classifier: embeddings of the hashed word ids,
    1-D convolutions of widths 3, 4 and 5 (``width`` filters each, ReLU), max-pooled over time,
    concatenated, then a linear layer.

    Padding never changes the logits: padded embeddings are zeroed, the convolutions are wide
    (zero-padded by width - 1 on both sides) and the max runs over the windows that hold at
    least one real token (of a document with none, over the first windows, which hold only
    zeros). Since ReLU outputs are >= 0, zeroing the other windows leaves that max as it is.
    """

    WIDTHS = (3, 4, 5)

    def __init__(self, buckets: int, width: int, num_classes: int):
        super().__init__()
        self.embedding = nn.Embedding(buckets + 1, width, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(width, width, w, padding=w - 1) for w in self.WIDTHS)
        self.classifier = nn.Linear(width * len(self.WIDTHS), num_classes)
        self.dim = width * len(self.WIDTHS)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """The document vector [B, 3 · width]: each width's max-pooled filters."""
        mask = ids > 0
        length = mask.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
        x = (self.embedding(ids) * mask.unsqueeze(-1)).transpose(1, 2)  # [B, width, L]
        pooled = []
        for w, conv in zip(self.WIDTHS, self.convs):
            h = torch.relu(conv(x))  # [B, F, L + w - 1]; window t covers tokens t-w+1 .. t
            t = torch.arange(h.shape[-1], device=ids.device).unsqueeze(0)
            valid = (t < length + (w - 1)).unsqueeze(1)  # the window starts at a real token or before
            pooled.append((h * valid).amax(-1))
        return torch.cat(pooled, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(ids))


TEXT_NETS = {"fasttext": FastText, "textcnn": TextCNN}


class _TextNet(nn.Module):
    """A text network in training: ``(logits, document vector)``, plus a loss's head (which
    trains with it and is dropped when it is deployed), like :class:`networks._Net`."""

    def __init__(self, arch: str, buckets: int, width: int, num_classes: int):
        super().__init__()
        if arch not in TEXT_NETS:
            raise ValueError(f"unknown text network {arch!r}; known: {', '.join(TEXT_NETS)}")
        self.net = TEXT_NETS[arch](buckets, width, num_classes)
        self.head: nn.Module | None = None

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vector = self.net.features(ids)
        return self.net.classifier(vector), vector


class TextNetStudent(TorchStudent):
    """A small torch network on hashed n-gram ids, distilled from cached teacher logits (any
    loss; a feature loss compares the cached feature with the network's document vector,
    ``student_layer=embed``).

    The featuriser (:class:`pipeline.text_features.HashedNgrams`: ``buckets``, ``max_tokens``,
    ``ngrams``) is part of the student: documents reach it as str, in training, validation,
    scoring and latency timing alike. ``width``: embedding width (and TextCNN's filters per
    convolution width). ``weight_decay`` defaults to 0: AdamW's decay shrinks every row of the
    embedding at every step, also the n-grams a batch does not hold, so rare n-grams would fade
    between their appearances. Everything else is :class:`TorchStudent`'s.
    """

    fixed_params = ("arch",)  # names the registry entry (fasttext, textcnn)

    def __init__(self, arch: str = "fasttext", width: int = 64, buckets: int = 65536,
                 max_tokens: int = 256, ngrams: int = 2, loss: str = "kd",
                 loss_params: dict | None = None, epochs: int = 20, lr: float = 1e-2,
                 weight_decay: float = 0.0, batch_size: int = 64, seed: int = 0,
                 device: str = "auto"):
        self.arch = arch
        self.width = width
        self.buckets = buckets
        self.max_tokens = max_tokens
        self.ngrams = ngrams
        self.loss = loss
        self.loss_params = loss_params
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def featuriser(self) -> HashedNgrams:
        """Documents -> int64 ids [N, L] (:mod:`pipeline.text_features`)."""
        return HashedNgrams(buckets=int(self.buckets), max_tokens=int(self.max_tokens),
                            ngrams=int(self.ngrams))

    def _ids(self, X) -> LazyRows:
        """Documents ``X`` (an array or LazyRows of str) as ids, featurised slice by slice."""
        featurise = self.featuriser()
        return LazyRows(len(X), (), lambda a, b: featurise(documents(X[a:b])), dtype=np.int64)

    def fit_cache(self, data: StudentData) -> "TextNetStudent":
        if data.views != 1:
            raise KdError(f"model {self.arch} reads each document once, and this run draws from "
                          f"{data.views} cached views; pass views=1")
        return super().fit_cache(data)

    def _fit_batches(self, batches: training.Batches, steps_per_epoch: int, X_val, y_val,
                     num_classes, teacher_shape, teacher_layer, temperature,
                     progress: bool = False) -> "TextNetStudent":
        """:meth:`TorchStudent._fit_batches` on the documents' ids: each batch is featurised as
        it arrives (padded to its longest document), validation rows slice by slice."""
        featurise = self.featuriser()

        def ids(epoch: int):
            for x, y, targets in batches(epoch):
                yield featurise(documents(x)), y, targets

        return super()._fit_batches(ids, steps_per_epoch, self._ids(X_val), y_val, num_classes,
                                    teacher_shape, teacher_layer, temperature, progress)

    def _augmentation(self, input_shape):
        return None  # text has no augmentation policy (cached targets hold for the documents seen)

    def _build(self, input_shape, num_classes: int, teacher_shape: tuple[int, ...] | None,
               teacher_layer: str | None, temperature: float | None):
        needs = LOSSES.declared(self.loss)
        self.device_ = runtime.pick_device(self.device)
        torch.manual_seed(self.seed)
        self.classes_ = np.arange(num_classes)
        self.input_shape_ = ()
        self.model_ = _TextNet(self.arch, int(self.buckets), int(self.width), num_classes)
        self.student_layer_ = None
        if needs.maps:
            raise KdError(f"loss {self.loss} compares spatial feature maps, and model {self.arch} "
                          "has none (its one feature is its document vector); pick a logit loss "
                          "(kd, dkd, ...) or a loss on feature vectors (fitnet, rkd, ...)")
        if needs.features:
            asked = self._loss_param("student_layer")
            if asked not in (None, "embed"):
                raise KdError(f"student {self.arch} has no layer {asked!r}; its one layer a "
                              "feature loss reads is embed (its document vector)")
            self.student_layer_ = "embed"
            if needs.head is not None:
                self.model_.head = needs.head((self.model_.net.dim,), teacher_shape)
        return self._objective(temperature)

    def decision_function(self, X) -> np.ndarray:
        """Logits [N, K] of documents ``X`` (an array or LazyRows of str)."""
        return training.predict_logits(self.model_, self._ids(X), self.device_)

    def predict_proba(self, X) -> np.ndarray:
        return softmax(self.decision_function(X))

    def load_tensors(self, tensors: dict[str, np.ndarray], input_shape=None,
                     num_classes: int = 0) -> "TextNetStudent":
        """The trained network rebuilt from :meth:`tensors` (a strict load), on the CPU, in
        eval mode."""
        self.model_ = _TextNet(self.arch, int(self.buckets), int(self.width), num_classes)
        self.model_.net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})
        self.model_.eval()
        self.classes_, self.device_ = np.arange(num_classes), torch.device("cpu")
        self.input_shape_ = ()
        return self

    def deployed_module(self) -> nn.Module:
        """The trained network alone on the CPU, int64 ids [batch, length] -> logits (what
        is exported; documents become ids through :meth:`featuriser`)."""
        net = TEXT_NETS[self.arch](int(self.buckets), int(self.width), len(self.classes_))
        net.load_state_dict({k: v.detach().cpu() for k, v in self.model_.net.state_dict().items()})
        return net.eval()

    def cpu_predict(self):
        """``predict(documents)``: featurise and score on the CPU, as a deployment would (the
        text processing is part of the student's cost)."""
        predict, featurise = torch_predict(self.deployed_module()), self.featuriser()
        return lambda docs: predict(featurise(documents(docs)))


# Each entry fixes the estimator / network; their hyperparameters are the constructors' arguments
STUDENTS.register("tfidf_logreg", kind="inputs", modality="text", export="skops")(
    partial(TfidfStudent, estimator="logreg"))
STUDENTS.register("tfidf_svc", kind="inputs", modality="text", export="skops")(
    partial(TfidfStudent, estimator="linear_svc"))
STUDENTS.register("fasttext", kind="inputs", loss=True, modality="text")(
    partial(TextNetStudent, arch="fasttext", ngrams=2))
STUDENTS.register("textcnn", kind="inputs", loss=True, modality="text")(
    partial(TextNetStudent, arch="textcnn", ngrams=1))
