"""The ``lm`` student: a small causal transformer (transformers' ``LlamaForCausalLM`` built from
a ``LlamaConfig``: ``layers``, ``width``, ``heads``) distilled from a token cache — windows of
token ids, a loss mask, document segments, and the teacher's per-position sparse distributions
(``logits=topk:K``, ``sample:K``, ``topk:K+sample:M``; see docs/CACHE_FORMAT.md).

Position j predicts token j + 1. The loss is a registered loss's token form
(:func:`pipeline.losses.token_form`: ``kd`` the forward KL over the listed ids and the tail,
``kd_renorm``, ``reverse_kl``, ``jsd``, ``ce``), computed over the masked positions in chunks
from the student's hidden states, so the [B, T, V] logits are never held
(:func:`pipeline.lm_losses.position_loss`). The vocabulary is the cache's (``len(tokenizer)``,
the ids the targets index); an output layer padded beyond it is sliced to it.

Training from a cache (:meth:`LMStudent.fit_cache`) streams its windows batch by batch
(:meth:`pipeline.cache.reader.TeacherCache.token_batches`), so memory is flat in the number of
windows; the teacher's targets at T are made per batch.

Metrics (:meth:`LMStudent.score`, on held-out windows, streamed): perplexity of the true next
tokens, next-token accuracy, agreement with the teacher's top-1, and the KL from the teacher on
the K + tail support at T = 1 (exact there; not measurable from sample:K draws: None).

``transformers`` is imported when a model is built, never at import: image-only users do not
pay for it.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from pipeline import lm_losses, runtime
from pipeline.errors import KdError, first_line
from pipeline.losses import LOSSES, loss_arguments, token_form
from pipeline.sparse import DENSE, SAMPLE, TOPK, TOPK_SAMPLE, SparseLogits, check_temperature, encode_topk
from pipeline.students.base import Student
from pipeline.students.registry import STUDENTS


@dataclass
class Windows:
    """Token windows of one split, as a token cache stores them: ``ids`` int64 [N, T],
    ``mask`` bool [N, T] (position j has a target: token j + 1 is real), ``segments`` int32
    [N, T] (document index within the window, −1 on padding), ``targets`` the teacher's
    per-position sparse logits (leading axes [N, T]; None for label-only training)."""

    ids: np.ndarray
    mask: np.ndarray
    segments: np.ndarray
    targets: SparseLogits | None = None

    def __len__(self) -> int:
        return len(self.ids)


def head_only(targets: SparseLogits) -> SparseLogits:
    """A topk:K+sample:M cache's topk:K part (its head and tail's mass; the draws left out),
    for losses over the K + tail support; topk targets as they are."""
    if targets.kind == TOPK_SAMPLE:
        return SparseLogits(TOPK, targets.classes, targets.values, targets.tail, targets.num_classes,
                            targets.temperature)
    return targets


def top1(targets: SparseLogits) -> np.ndarray:
    """The teacher's most likely next token per position [N, T]: its largest logit (topk,
    topk+sample), its most drawn id (sample; ties to the smaller id)."""
    if targets.kind != SAMPLE:
        return targets.classes[..., 0]
    ids = targets.classes  # sorted: the longest run of equal ids
    flat = ids.reshape(-1, ids.shape[-1])
    out = np.empty(len(flat), np.int64)
    for i, row in enumerate(flat):
        values, counts = np.unique(row, return_counts=True)
        out[i] = values[np.argmax(counts)]
    return out.reshape(ids.shape[:-1])


class LMStudent(Student):
    """A small causal LM (Llama architecture from a config) distilled from a token cache.

    ``layers`` transformer blocks of ``width`` channels and ``heads`` attention heads (the
    MLP 4 × ``width`` wide; input and output embeddings tied, as in small Llamas); trained
    ``epochs`` times over the train windows with AdamW (``lr``, ``weight_decay``), a linear
    warm-up over the first 5 % of steps and cosine decay; the epoch with the lowest held-out
    perplexity is kept. ``loss`` / ``loss_params``: a loss with a token form and its registered
    parameters (``temperature``: None, the cache's; ``alpha``, ...). ``chunk``: positions per
    chunk of the loss (its memory is chunk × vocabulary).
    """

    def __init__(self, layers: int = 2, width: int = 64, heads: int = 4, loss: str = "kd",
                 loss_params: dict | None = None, epochs: int = 4, lr: float = 3e-3,
                 weight_decay: float = 0.01, batch_size: int = 16, chunk: int = lm_losses.POSITION_CHUNK,
                 seed: int = 0, device: str = "auto"):
        self.layers = layers
        self.width = width
        self.heads = heads
        self.loss = loss
        self.loss_params = loss_params
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.chunk = chunk
        self.seed = seed
        self.device = device

    # ------------------------------------------------------------------ training
    def fit_cache(self, data) -> "LMStudent":
        """Train from an opened token cache's train windows, streamed batch by batch
        (:meth:`TeacherCache.token_batches`: memory flat in the number of windows), the epoch
        kept chosen on val (streamed too). The vocabulary is the cache's ``len(tokenizer)``,
        checked against the teacher's output layer (:func:`pipeline.lm_losses.shared_vocabulary`),
        and the tokenizer the cache's data names must still be the one the cache records."""
        from pipeline.students.data import stream_seed

        cache = data.cache
        if data.modality != "tokens":
            raise KdError(f"model lm trains from a token cache (dataset=tokens:PATH with a causal-LM "
                          f"teacher); cache {cache.root} holds {data.modality} data")
        lm = cache.lm
        self.tokenizer_ = student_tokenizer(cache)
        mode = cache.logits_mode
        shape = (mode.kind, float(cache.manifest["logits"].get("temperature", cache.temperature)),
                 mode.draws if mode.kind == SAMPLE else mode.k)
        if not mode.sparse:  # read as topk:C-1 (cache_batches): exact, the kind stays dense
            shape = (DENSE, shape[1], int(lm["vocab_size"]) - 1)

        def train(epoch: int) -> Iterator[Windows]:
            return cache_batches(cache, "train", self.batch_size, seed=stream_seed(self.seed, epoch))

        return self._fit(train, cache.num_rows("train"), int(lm["seq_len"]), int(lm["vocab_size"]),
                         lambda: cache_batches(cache, "val", self.batch_size), targets=shape,
                         teacher_outputs=int(lm["outputs"]), progress=getattr(data, "progress", False))

    def fit(self, train: Windows, vocab: int, *, val: Windows, cache_temperature: float | None = None,
            progress: bool = False) -> "LMStudent":
        """Train on in-memory windows whose targets index ``vocab`` token ids (``len(tokenizer)``);
        ``val`` picks the epoch kept (lowest perplexity)."""
        rng = np.random.default_rng(self.seed)

        def batches(epoch: int) -> Iterator[Windows]:
            for at in np.array_split(rng.permutation(len(train)), -(-len(train) // self.batch_size)):
                yield take(train, at)

        t = train.targets
        shape = None if t is None else (t.kind, t.temperature if cache_temperature is None else cache_temperature,
                                        t.classes.shape[-1])
        return self._fit(batches, len(train), train.ids.shape[1], vocab, lambda: slices(val, self.batch_size),
                         targets=shape, teacher_outputs=vocab, progress=progress)

    def _fit(self, batches: Callable[[int], Iterable[Windows]], n_train: int, seq_len: int, vocab: int,
             val: Callable[[], Iterable[Windows]], *, targets: tuple[str, float, int] | None,
             teacher_outputs: int, progress: bool) -> "LMStudent":
        """The training loop over ``batches(epoch)`` (``n_train`` windows of ``seq_len``), model
        selection on ``val()``. ``targets``: (kind, the cache's temperature, K or draws per
        position) of the teacher's targets (kind dense: every logit, as topk:V−1), None without
        any; the loss's form may depend on the kind (kd: :data:`pipeline.losses.KD_TOKEN_FORMS`)."""
        needs = LOSSES.declared(self.loss)
        form = token_form(self.loss, targets[0] if targets else None)
        reads_teacher = needs.logits
        given = (self.loss_params or {}).get("temperature")
        temperature = given if given is not None else (targets[1] if targets else 1.0)
        if reads_teacher:
            if targets is None:
                raise KdError(f"loss={self.loss} reads the teacher's targets, and these windows have "
                              "none; use loss=ce or a token cache with logits")
            self._check_targets(targets, temperature)
        if bool((self.loss_params or {}).get("standardize_logits")):
            raise KdError("standardize_logits=true needs every logit, and a token cache keeps sparse "
                          "ones; use standardize_logits=false")
        arguments = loss_arguments(self.loss, {**(self.loss_params or {}), "temperature": temperature})
        arguments = {k: v for k, v in arguments.items() if k not in ("weight", "standardize")}
        self.temperature_ = temperature if needs.temperature else None
        self._build(vocab, seq_len, teacher_outputs)
        model = self.model_
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        steps = self.epochs * -(-n_train // self.batch_size)
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
        best, self.history_, t0 = None, [], time.perf_counter()
        for epoch in range(self.epochs):
            model.train()
            total, positions = 0.0, 0
            for w in batches(epoch):
                batch = {}
                if reads_teacher:  # the teacher's distribution at T, this batch's only
                    source = w.targets if self.loss == "kd" else head_only(w.targets)
                    batch = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device_)
                             for k, v in source.targets(temperature).items()}
                ids = torch.from_numpy(w.ids).to(self.device_)
                mask = torch.from_numpy(w.mask).to(self.device_)
                logits_of = self._positions(ids, torch.from_numpy(w.segments >= 0).to(self.device_))
                loss = lm_losses.position_loss(form, logits_of, mask, lm_losses.next_ids_of(ids), batch,
                                               vocab=self.vocab_, chunk=self.chunk, **arguments)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                n = int(mask.sum())
                total, positions = total + float(loss.detach()) * n, positions + n
            scores = self.score(val())
            self.history_.append({"epoch": epoch, "train_loss": total / max(1, positions), **scores})
            if progress:
                print(f"lm epoch {epoch}: train loss {total / max(1, positions):.4f}, "
                      f"val perplexity {scores['perplexity']:.2f}")
            if best is None or scores["perplexity"] < best[0]:
                best = (scores["perplexity"], epoch, copy.deepcopy(model.state_dict()))
        model.load_state_dict(best[2])
        self.best_epoch_, self.fit_seconds_ = best[1], time.perf_counter() - t0
        model.eval()
        return self

    def _check_targets(self, targets: tuple[str, float, int], temperature: float) -> None:
        """Refuse up front what the cached targets (kind, T_c, width) cannot serve: another
        temperature than a draws cache's, and a loss over the K + tail support from draws alone."""
        kind, cache_temperature, width = targets
        check_temperature(kind, cache_temperature, temperature)
        if self.loss != "kd" and kind == SAMPLE:
            raise KdError(f"loss={self.loss} compares the student with the teacher's top K and tail, "
                          f"and this cache keeps sample:{width} draws (no "
                          "probabilities); use loss=kd (sampled KD), or a topk:K or topk:K+sample:M cache")

    def _build(self, vocab: int, seq_len: int, teacher_outputs: int | None = None) -> None:
        """The model for ``vocab`` token ids and windows of ``seq_len``; ``teacher_outputs``: the
        teacher's output layer (≥ ``vocab``; padded ids are sliced away)."""
        from transformers import LlamaConfig, LlamaForCausalLM  # lazily: text users only

        if self.width % self.heads:
            raise KdError(f"width={self.width} is not a multiple of heads={self.heads}; pick a width "
                          f"divisible by the heads (e.g. width={self.heads * max(1, self.width // self.heads)})")
        self.device_ = runtime.pick_device(self.device)
        torch.manual_seed(self.seed)
        config = LlamaConfig(vocab_size=vocab, hidden_size=self.width, intermediate_size=4 * self.width,
                             num_hidden_layers=self.layers, num_attention_heads=self.heads,
                             num_key_value_heads=self.heads, max_position_embeddings=seq_len,
                             tie_word_embeddings=True, attn_implementation="sdpa")
        self.model_ = LlamaForCausalLM(config).to(self.device_)
        self.vocab_ = lm_losses.shared_vocabulary(config.vocab_size, teacher_outputs or vocab, vocab)
        self.seq_len_ = seq_len
        self.classes_ = np.arange(vocab)

    def _positions(self, ids: torch.Tensor, real: torch.Tensor) -> lm_losses.OutputLayer:
        """The student's last hidden states of every position and its output layer, as an
        :class:`~pipeline.lm_losses.OutputLayer`: called with flat position indices it gives
        their logits (the whole [B, T, V] logits are never made), and ``loss=kd`` runs fused
        with it. ``real``: the non-padding tokens."""
        hidden = self.model_.model(input_ids=ids, attention_mask=real.long()).last_hidden_state
        return lm_losses.OutputLayer(hidden.reshape(-1, hidden.shape[-1]), self.model_.lm_head.weight)

    # ------------------------------------------------------------------ scoring
    def evaluate(self, windows: Windows) -> dict[str, float | None]:
        """:meth:`score` of in-memory windows."""
        return self.score(slices(windows, self.batch_size))

    def evaluate_cache(self, cache, split: str) -> dict[str, float | None]:
        """:meth:`score` of a token cache's ``split``, streamed batch by batch."""
        return self.score(cache_batches(cache, split, self.batch_size))

    @torch.inference_mode()
    def score(self, batches: Iterable[Windows]) -> dict[str, float | None]:
        """Over batches of windows: ``perplexity`` = exp(mean NLL of the true next tokens over
        the masked positions); ``accuracy`` = the share of those where the student's top token
        is the true next one; ``agreement`` = ... where it is the teacher's top-1; ``kl`` = mean
        KL(teacher ‖ student) over the K + tail support at T = 1 (exact there; None from
        sample:K draws or without targets); ``tokens``: the positions scored."""
        self.model_.eval()
        nll, right, agree, kl, positions = 0.0, 0, 0, 0.0, 0
        teacher = exact = None
        for w in batches:
            teacher = w.targets is not None
            exact = teacher and w.targets.kind != SAMPLE
            t1 = head_only(w.targets).targets(1.0) if exact else None
            teacher_top = torch.from_numpy(top1(w.targets).reshape(-1)).to(self.device_) if teacher else None
            ids = torch.from_numpy(w.ids).to(self.device_)
            mask = torch.from_numpy(w.mask).to(self.device_)
            logits_of = self._positions(ids, torch.from_numpy(w.segments >= 0).to(self.device_))
            rows = mask.reshape(-1).nonzero().squeeze(1)
            nxt = lm_losses.next_ids_of(ids).reshape(-1)[rows]
            for c in range(0, len(rows), self.chunk):
                at, y = rows[c:c + self.chunk], nxt[c:c + self.chunk]
                z = logits_of(at)[:, :self.vocab_].float()
                nll += float(torch.nn.functional.cross_entropy(z, y, reduction="sum"))
                top = z.argmax(1)
                right += int((top == y).sum())
                if teacher:
                    agree += int((top == teacher_top[at]).sum())
                if t1 is not None:
                    part = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device_)
                            .reshape(-1, *v.shape[2:])[at] for k, v in t1.items()}
                    kl += float(lm_losses.forward_kl(z, y, T=1.0, alpha=1.0, **part).sum())
            positions += len(rows)
        n = max(1, positions)
        return {"perplexity": math.exp(nll / n), "accuracy": right / n,
                "agreement": agree / n if teacher else None,
                "kl": kl / n if exact else None, "tokens": positions}

    @torch.inference_mode()
    def decision_function(self, ids: np.ndarray, real: np.ndarray | None = None) -> np.ndarray:
        """Next-token logits [N, T, vocab] of windows of token ids [N, T]; ``real`` [N, T]: the
        tokens that are not padding (the attention mask; None: every token is real)."""
        self.model_.eval()
        out = []
        for a in range(0, len(ids), self.batch_size):
            x = torch.from_numpy(np.asarray(ids[a:a + self.batch_size], np.int64)).to(self.device_)
            mask = None if real is None else torch.from_numpy(
                np.asarray(real[a:a + self.batch_size], np.int64)).to(self.device_)
            out.append(self.model_(input_ids=x, attention_mask=mask).logits[..., :self.vocab_]
                       .float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.seq_len_, self.vocab_), np.float32)

    def predict(self, ids: np.ndarray) -> np.ndarray:
        """The most likely next token at every position [N, T]."""
        return self.decision_function(ids).argmax(-1)

    def predict_proba(self, ids: np.ndarray) -> np.ndarray:
        z = self.decision_function(ids)
        z = np.exp(z - z.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)

    @property
    def n_params_(self) -> int:
        """Parameters of the deployed model (tied embeddings counted once)."""
        return sum(p.numel() for p in self.model_.parameters())

    def tensors(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().contiguous().numpy() for k, v in self.model_.state_dict().items()}

    def load_tensors(self, tensors: dict[str, np.ndarray], input_shape: tuple[int, ...],
                     num_classes: int) -> "LMStudent":
        """The trained model rebuilt from :meth:`tensors` for windows of ``input_shape`` = (T,)
        over ``num_classes`` token ids, on the CPU, in eval mode."""
        self.device = "cpu"
        self._build(num_classes, int(input_shape[0]))
        self.model_.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})
        self.model_.eval()
        return self

    def cpu_predict(self) -> Callable[[np.ndarray], np.ndarray]:
        """``predict(ids)``: the deployed model on the CPU, the next token at every position of
        windows ``[B, T]`` (what a causal-LM teacher is timed doing: a forward and an argmax)."""
        module = self.deployed_module()

        @torch.inference_mode()
        def predict(ids: np.ndarray) -> np.ndarray:
            return module(torch.from_numpy(np.asarray(ids, np.int64))).argmax(-1).numpy()

        return predict

    def to_transformers(self, tokenizer) -> torch.nn.Module:
        """The trained model as a standalone transformers ``LlamaForCausalLM`` on the CPU, for
        ``save_pretrained`` (what ``kdcache export format=hf`` writes): its ``vocab_size`` the
        student's (the cache's ``len(tokenizer)``), its EOS, padding and BOS ids the
        tokenizer's (the ones the cache's windows were made with), and a generation config
        that stops at that EOS."""
        from transformers import GenerationConfig

        from pipeline.data.tokens import eos_id, pad_id

        model = copy.deepcopy(self.model_).cpu().eval()
        config = model.config
        config.eos_token_id, config.pad_token_id = eos_id(tokenizer), pad_id(tokenizer)
        config.bos_token_id = tokenizer.bos_token_id  # (None for a tokenizer without one)
        model.generation_config = GenerationConfig.from_model_config(config)
        return model

    def deployed_module(self) -> torch.nn.Module:
        """The trained model on the CPU as ids [N, T] -> logits [N, T, vocab]."""
        return _LogitsOnly(copy.deepcopy(self.model_).cpu().eval(), self.vocab_)


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, vocab: int):
        super().__init__()
        self.model, self.vocab = model, vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits[..., :self.vocab]


def take(w: Windows, at: np.ndarray | slice) -> Windows:
    """Windows ``at`` of ``w``, with their targets."""
    t = w.targets
    if t is not None:
        pick = lambda a: None if a is None else a[at]  # noqa: E731
        t = SparseLogits(t.kind, t.classes[at], pick(t.values), pick(t.tail), t.num_classes, t.temperature,
                         pick(t.draws))
    return Windows(w.ids[at], w.mask[at], w.segments[at], t)


def slices(w: Windows, batch_size: int) -> Iterator[Windows]:
    """In-memory windows in batches, in order."""
    for a in range(0, len(w), batch_size):
        yield take(w, slice(a, a + batch_size))


def batch_windows(b) -> Windows:
    """A :class:`~pipeline.cache.reader.TokenBatch` as :class:`Windows`; a dense cache's logits
    become topk:V−1 targets (one id in the tail: exact at every T)."""
    if b.kind != "dense":
        targets = b.targets_at()
    else:
        n, length, c = b.logits.shape
        cls, values, tail = encode_topk(b.logits.reshape(-1, c), c - 1, c, b.temperature)
        targets = SparseLogits(TOPK, cls.astype(np.int64).reshape(n, length, c - 1),
                               values.reshape(n, length, c - 1), tail.reshape(n, length, 2), c, b.temperature)
    return Windows(b.ids, b.mask, b.segments.astype(np.int32), targets)


def cache_batches(cache, split: str, batch_size: int, seed: int | None = None) -> Iterator[Windows]:
    """A token cache's ``split`` as batches of :class:`Windows`, streamed (whole chunks at a
    time, :meth:`TeacherCache.token_batches`): block-shuffled with ``seed``, in order without."""
    for b in cache.token_batches(split, batch_size, shuffle=seed is not None, seed=seed or 0):
        yield batch_windows(b)


def student_tokenizer(cache) -> dict:
    """The record of the tokenizer a student of token cache ``cache`` reads and writes text
    with: the ``tokenizer=DIR`` (or GGUF file) the cache's data was tokenized with, which must
    still be the one the cache records (the teacher's: same fingerprint), else refused in one
    line. A tokenizer that is gone leaves the cache's record (the student reads the cached ids
    alone)."""
    found = cache_tokenizer(cache)
    return cache.lm["tokenizer"] if found is None else found[1]


def cache_tokenizer(cache) -> tuple[object, dict] | None:
    """The tokenizer the token cache ``cache``'s data names (``tokenizer=DIR`` or a GGUF file)
    and its record, loaded and checked to be the one the cache records (same fingerprint),
    else refused in one line; None when it is gone."""
    from pipeline.data.tokens import tokenizer_record
    from pipeline.hf import load_tokenizer

    want = cache.lm["tokenizer"]
    folder = (cache.manifest["dataset"].get("config") or {}).get("tokenizer") or ""
    if not folder or not Path(folder).expanduser().exists():
        return None
    try:
        tok = load_tokenizer(folder)
        record = tokenizer_record(tok, Path(folder))
    except KdError as exc:
        raise KdError(f"the tokenizer folder {folder} that cache {cache.root}'s data names cannot be "
                      f"loaded any more ({first_line(exc, 100)}); restore the tokenizer it was built "
                      "with, or build a new cache") from None
    if record["fingerprint"] != want["fingerprint"]:
        raise KdError(f"the tokenizer in {folder} ({record['vocab_size']:,} ids, fingerprint "
                      f"{record['fingerprint'][:12]}) is not the one cache {cache.root} was built with "
                      f"({want['vocab_size']:,} ids, {want['fingerprint'][:12]}); a student must share "
                      "the teacher's tokenizer: restore that tokenizer, or build a new cache with this one")
    return tok, record


STUDENTS.register("lm", kind="inputs", loss=True, modality="tokens", export="hf")(LMStudent)
