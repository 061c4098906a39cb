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

Metrics (:meth:`LMStudent.evaluate`, on held-out windows): perplexity of the true next tokens,
next-token agreement with the teacher's top-1, and the KL from the teacher on the K + tail
support at T = 1 (exact there; not measurable from sample:K draws: None).

``transformers`` is imported when a model is built, never at import: image-only users do not
pay for it.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline import lm_losses, runtime
from pipeline.errors import KdError
from pipeline.losses import LOSSES, loss_arguments, token_form
from pipeline.sparse import SAMPLE, TOPK, TOPK_SAMPLE, SparseLogits, check_temperature
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
        """Train from an opened token cache's train windows (model selection on val)."""
        cache = data.cache
        if data.modality != "tokens":
            raise KdError(f"model lm trains from a token cache (dataset=tokens:PATH with a causal-LM "
                          f"teacher); cache {cache.root} holds {data.modality} data")
        return self.fit(cache_windows(cache, "train"), cache.num_classes, val=cache_windows(cache, "val"),
                        cache_temperature=cache.temperature, progress=getattr(data, "progress", False))

    def fit(self, train: Windows, vocab: int, *, val: Windows, cache_temperature: float | None = None,
            progress: bool = False) -> "LMStudent":
        """Train on in-memory windows whose targets index ``vocab`` token ids (``len(tokenizer)``);
        ``val`` picks the epoch kept (lowest perplexity)."""
        needs = LOSSES.declared(self.loss)
        form = token_form(self.loss)
        reads_teacher = needs.logits
        given = (self.loss_params or {}).get("temperature")
        temperature = given if given is not None else (cache_temperature or 1.0)
        if reads_teacher:
            if train.targets is None:
                raise KdError(f"loss={self.loss} reads the teacher's targets, and these windows have "
                              "none; use loss=ce or a token cache with logits")
            self._check_targets(train.targets, temperature)
        if bool((self.loss_params or {}).get("standardize_logits")):
            raise KdError("standardize_logits=true needs every logit, and a token cache keeps sparse "
                          "ones; use standardize_logits=false")
        arguments = loss_arguments(self.loss, {**(self.loss_params or {}), "temperature": temperature})
        arguments = {k: v for k, v in arguments.items() if k not in ("weight", "standardize")}
        self.temperature_ = temperature if needs.temperature else None
        self._build(vocab, train.ids.shape[1])
        targets = None
        if reads_teacher:
            source = train.targets if self.loss == "kd" else head_only(train.targets)
            targets = source.targets(temperature)
        model = self.model_
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        steps = self.epochs * -(-len(train) // self.batch_size)
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
        rng = np.random.default_rng(self.seed)
        best, self.history_, t0 = None, [], time.perf_counter()
        for epoch in range(self.epochs):
            model.train()
            total, positions = 0.0, 0
            for at in np.array_split(rng.permutation(len(train)), -(-len(train) // self.batch_size)):
                batch = {k: torch.from_numpy(np.ascontiguousarray(v[at])).to(self.device_)
                         for k, v in (targets or {}).items()}
                ids = torch.from_numpy(train.ids[at]).to(self.device_)
                mask = torch.from_numpy(train.mask[at]).to(self.device_)
                logits_of = self._positions(ids, torch.from_numpy(train.segments[at] >= 0).to(self.device_))
                loss = lm_losses.position_loss(form, logits_of, mask, lm_losses.next_ids_of(ids), batch,
                                               vocab=self.vocab_, chunk=self.chunk, **arguments)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                n = int(mask.sum())
                total, positions = total + float(loss.detach()) * n, positions + n
            scores = self.evaluate(val)
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

    def _check_targets(self, targets: SparseLogits, temperature: float) -> None:
        """Refuse up front what the cached targets cannot serve: another temperature than a
        draws cache's, and a loss over the K + tail support from draws alone."""
        check_temperature(targets.kind, targets.temperature, temperature)
        if self.loss != "kd" and targets.kind == SAMPLE:
            raise KdError(f"loss={self.loss} compares the student with the teacher's top K and tail, "
                          f"and this cache keeps sample:{targets.classes.shape[-1]} draws (no "
                          "probabilities); use loss=kd (sampled KD), or a topk:K or topk:K+sample:M cache")

    def _build(self, vocab: int, seq_len: int) -> None:
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
        self.vocab_ = lm_losses.shared_vocabulary(config.vocab_size, vocab, vocab)
        self.seq_len_ = seq_len
        self.classes_ = np.arange(vocab)

    def _positions(self, ids: torch.Tensor, real: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Flat position indices -> the student's logits there (its LM head on its hidden
        states: the whole [B, T, V] logits are never made). ``real``: the non-padding tokens."""
        hidden = self.model_.model(input_ids=ids, attention_mask=real.long()).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        return lambda at: self.model_.lm_head(flat[at])

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def evaluate(self, windows: Windows) -> dict[str, float | None]:
        """On ``windows``: ``perplexity`` = exp(mean NLL of the true next tokens over the masked
        positions); ``agreement`` = the share of those where the student's top token is the
        teacher's; ``kl`` = mean KL(teacher ‖ student) over the K + tail support at T = 1 (exact
        there; None from sample:K draws or without targets)."""
        self.model_.eval()
        nll, agree, kl, positions = 0.0, 0, 0.0, 0
        exact = windows.targets is not None and windows.targets.kind != SAMPLE
        t1 = head_only(windows.targets).targets(1.0) if exact else None
        teacher_top = top1(windows.targets) if windows.targets is not None else None
        for a in range(0, len(windows), self.batch_size):
            at = slice(a, a + self.batch_size)
            ids = torch.from_numpy(windows.ids[at]).to(self.device_)
            mask = torch.from_numpy(windows.mask[at]).to(self.device_)
            logits_of = self._positions(ids, torch.from_numpy(windows.segments[at] >= 0).to(self.device_))
            rows = mask.reshape(-1).nonzero().squeeze(1)
            nxt = lm_losses.next_ids_of(ids).reshape(-1)[rows]
            for c in range(0, len(rows), self.chunk):
                z = logits_of(rows[c:c + self.chunk])[:, :self.vocab_].float()
                nll += float(torch.nn.functional.cross_entropy(z, nxt[c:c + self.chunk], reduction="sum"))
                if teacher_top is not None:
                    want = torch.from_numpy(teacher_top[at].reshape(-1)).to(self.device_)[rows[c:c + self.chunk]]
                    agree += int((z.argmax(1) == want).sum())
                if t1 is not None:
                    part = {k: torch.from_numpy(np.ascontiguousarray(v[at])).to(self.device_)
                            .reshape(-1, *v.shape[2:])[rows[c:c + self.chunk]] for k, v in t1.items()}
                    kl += float(lm_losses.forward_kl(z, nxt[c:c + self.chunk], T=1.0, alpha=1.0, **part).sum())
            positions += len(rows)
        n = max(1, positions)
        return {"perplexity": math.exp(nll / n),
                "agreement": agree / n if teacher_top is not None else None,
                "kl": kl / n if t1 is not None else None}

    @torch.inference_mode()
    def decision_function(self, ids: np.ndarray) -> np.ndarray:
        """Next-token logits [N, T, vocab] of windows of token ids [N, T] (no padding)."""
        self.model_.eval()
        out = []
        for a in range(0, len(ids), self.batch_size):
            x = torch.from_numpy(np.asarray(ids[a:a + self.batch_size], np.int64)).to(self.device_)
            out.append(self.model_(input_ids=x).logits[..., :self.vocab_].float().cpu().numpy())
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

    def deployed_module(self) -> torch.nn.Module:
        """The trained model on the CPU as ids [N, T] -> logits [N, T, vocab]."""
        return _LogitsOnly(copy.deepcopy(self.model_).cpu().eval(), self.vocab_)


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, vocab: int):
        super().__init__()
        self.model, self.vocab = model, vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits[..., :self.vocab]


def cache_windows(cache, split: str) -> Windows:
    """A token cache's windows of ``split`` (docs/CACHE_FORMAT.md, token caches:
    ``<split>/tokens/{ids,mask,segments}`` [N, T] and the logits mode's arrays [N, T, ...]); a
    dense cache's logits become topk:V−1 targets (one id in the tail: exact at every T)."""
    from pipeline.cache import format as fmt
    from pipeline.sparse import encode_topk

    n = cache.num_rows(split)
    ids, mask, segments = (cache.stored(f"{split}/tokens/{part}", 0, n) for part in ("ids", "mask", "segments"))
    mode, temperature = cache.logits_mode, cache.temperature
    if not mode.sparse:
        z = cache.stored(fmt.logits_key(split), 0, n).astype(np.float32)
        c = z.shape[-1]
        cls, values, tail = encode_topk(z.reshape(-1, c), c - 1, c, temperature)
        targets = SparseLogits(TOPK, cls.astype(np.int64).reshape(n, -1, c - 1), values.reshape(n, -1, c - 1),
                               tail.reshape(n, -1, 2), c, temperature)
    else:
        parts = {fmt.sparse_part(key, cache.manifest): cache.stored(key, 0, n)
                 for key in fmt.logits_keys(split, cache.manifest)}
        draws = parts.get("draws")
        targets = SparseLogits(mode.kind, parts["classes"].astype(np.int64),
                               None if "logits" not in parts else parts["logits"].astype(np.float32),
                               parts.get("tail"), cache.num_classes,
                               float(cache.manifest["logits"]["temperature"]),
                               None if draws is None else draws.astype(np.int64))
    return Windows(ids.astype(np.int64), mask.astype(bool), segments.astype(np.int32), targets)


STUDENTS.register("lm", kind="inputs", loss=True, modality="tokens")(LMStudent)
