"""A language-model teacher without a download: ``kdcache teacher dataset=tokens:PATH`` with no
``teacher=hf:`` (teacher=auto on a token dataset).

The data's tokenizer would come from the teacher, and there is none yet; so, in order:

1. the documents are read and split without a tokenizer (:func:`pipeline.data.tokens.read_documents`);
2. a byte-level BPE (the ``tokens`` library; ``vocab_size`` entries: the 256 bytes, an EOS
   ``<|endoftext|>`` and a pad ``<pad>``, then merges) is trained on the train split's
   documents only, so that val and test stay unseen;
3. the dataset is opened with it (windows of ``seq_len``, ``pack``), and a small causal LM
   (transformers' ``LlamaForCausalLM`` from a ``LlamaConfig``: :data:`LM_SIZE`, about 1M
   parameters at a 1,024-token vocabulary) trains on the train windows with next-token
   cross-entropy over the masked positions, AdamW (``lr``, ``weight_decay``), ``batch_size``
   windows per step, ``epochs`` passes; the epoch of the best validation perplexity is kept
   and test perplexity is scored once.

The teacher is saved as a Hugging Face model directory (``config.json``, ``model.safetensors``
and the tokenizer's files, by ``save_pretrained``), so that ``teacher=hf:<that folder>`` loads
it, with ``metrics.json`` and kdcache's resolved config (``kdcache_config.json``), under
``<teacher_dir>/<dataset slug>/lm-<key>/``: the key hashes the documents by split, the
tokenizer and model settings and the training settings (:func:`lm_identity`); the same command
finds it there again instead of training anew.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from pipeline import runtime
from pipeline.config import TeacherConfig, fingerprint
from pipeline.data import dataset_slug, split_spec
from pipeline.data.tokens import TokenDataset, read_documents
from pipeline.errors import KdError, StoppedEarly
from pipeline.io import atomic_write_text, fsync_dir
from pipeline.provenance import save_config

LM_ARCH = "lm"  # the folder name's prefix, and metrics' arch
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<pad>"
# the teacher's size: ~1.07M parameters at a 1,024-token vocabulary (untied input and output
# embeddings, 2 x 131k; four layers of 200k)
LM_SIZE = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
           "intermediate_size": 352}
EVAL_BATCH = 64  # windows per forward when scoring val and test


def wants_lm_teacher(cfg: TeacherConfig) -> bool:
    """Whether ``cfg`` asks for the teacher trained here: teacher=auto on dataset=tokens:PATH."""
    return cfg.teacher == "auto" and split_spec(cfg.dataset)[0] == "tokens"


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (transformers' fast tokenizer) of ``vocab_size`` entries trained on
    ``texts``: every byte is in it (no text is unknown), with an EOS and a pad token."""
    from pipeline.hf import _transformers

    transformers = _transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN,
                                                bos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def lm_config(tokenizer, seq_len: int, **size):
    """A ``LlamaConfig`` for ``tokenizer``'s vocabulary and windows of ``seq_len`` tokens
    (``size``: :data:`LM_SIZE`'s keys, overriding it)."""
    from transformers import LlamaConfig

    dims = {**LM_SIZE, **size}
    return LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=seq_len,
                       num_key_value_heads=dims["num_attention_heads"],
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **dims)


def documents_fingerprint(documents: dict[str, list[str]]) -> str:
    """sha256 of the documents by split (each length-prefixed UTF-8, in order)."""
    h = hashlib.sha256()
    for split in ("train", "val", "test"):
        h.update(f"{split}:{len(documents[split])}|".encode())
        for doc in documents[split]:
            data = doc.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def lm_identity(cfg: TeacherConfig, documents: dict[str, list[str]]) -> dict:
    """What determines the trained teacher, and so where it is stored: the documents by split
    (hence the file, seed, val_fraction and test_fraction), vocab_size, seq_len, pack, the
    model's size, the training settings, and the versions of the libraries that train it."""
    import importlib.metadata

    return {"arch": LM_ARCH, "documents": documents_fingerprint(documents),
            "vocab_size": cfg.vocab_size, "seq_len": cfg.seq_len, "pack": cfg.pack,
            "size": LM_SIZE, "seed": cfg.seed, "epochs": cfg.epochs, "lr": cfg.lr,
            "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
            "transformers": importlib.metadata.version("transformers"),
            "tokenizers": importlib.metadata.version("tokenizers")}


def lm_teacher_dir(cfg: TeacherConfig, documents: dict[str, list[str]]) -> Path:
    """``<teacher_dir>/<dataset slug>/lm-<first 12 hex of the key>``."""
    key = fingerprint(lm_identity(cfg, documents))
    return Path(cfg.teacher_dir) / dataset_slug(cfg.dataset) / f"{LM_ARCH}-{key[:12]}"


def stored_lm_teacher(cfg: TeacherConfig) -> Path | None:
    """The folder of the teacher trained for ``cfg`` (a Hugging Face model directory), or None
    when there is none yet."""
    folder = lm_teacher_dir(cfg, read_documents(split_spec(cfg.dataset)[1], cfg))
    return folder if (folder / "model.safetensors").is_file() else None


def ensure_lm_teacher(cfg: TeacherConfig, progress: bool = True) -> Path:
    """The trained teacher's folder for ``cfg`` (teacher=hf:<it> loads it), trained first when
    there is none: what ``kdcache cache`` on a token dataset with teacher=auto uses."""
    return Path(train_lm_teacher(cfg, progress)["checkpoint"])


def train_lm_teacher(cfg: TeacherConfig, progress: bool = True) -> dict:
    """Train the tokenizer and the causal LM for ``cfg`` (or find them trained) and save them
    as a Hugging Face model directory; return the metrics, with ``checkpoint`` the folder."""
    with runtime.torch_threads(cfg.threads):
        return _train(cfg, progress)


def _train(cfg: TeacherConfig, progress: bool) -> dict:
    documents = read_documents(split_spec(cfg.dataset)[1], cfg)
    identity = lm_identity(cfg, documents)
    out = lm_teacher_dir(cfg, documents)
    if (out / "model.safetensors").is_file() and (out / "metrics.json").is_file():
        metrics = json.loads((out / "metrics.json").read_text())
        if metrics.get("key") == fingerprint(identity):
            return {**{k: v for k, v in metrics.items() if k != "history"}, "checkpoint": str(out)}
    from transformers import LlamaForCausalLM

    device = runtime.pick_device(cfg.device)
    started = time.perf_counter()
    tokenizer = train_tokenizer(documents["train"], cfg.vocab_size)
    # opened before anything is written: data that cannot be windowed leaves no folder behind
    dataset = TokenDataset(f"tokens:{split_spec(cfg.dataset)[1]}", documents, tokenizer, None,
                           dataclasses.replace(cfg, tokenizer=str(out)))
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        tokenizer.save_pretrained(tmp)
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(lm_config(tokenizer, cfg.seq_len)).to(device)
        params = sum(p.numel() for p in model.parameters())
        result = _fit(model, dataset, cfg, device, progress)
        model.load_state_dict(result["best_state"])
        test_ppl = perplexity(model, dataset, "test", device)
        metrics = {"arch": LM_ARCH, "dataset": cfg.dataset, "key": fingerprint(identity),
                   "dataset_fingerprint": dataset.fingerprint,
                   "tokenizer": dataset.tokenizer_record["fingerprint"], "vocab_size": len(tokenizer),
                   "params": params, "best_epoch": result["best_epoch"],
                   "val_perplexity": result["best_val"], "test_perplexity": test_ppl,
                   "uniform_perplexity": float(len(tokenizer)),
                   "fit_seconds": round(time.perf_counter() - started, 2),
                   "history": result["history"]}
        model.cpu().save_pretrained(tmp)
        save_config(cfg, tmp / "kdcache_config.json")
        atomic_write_text(tmp / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        fsync_dir(out.parent)
    except KeyboardInterrupt:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoppedEarly("teacher training stopped; re-run the same command to train it "
                           "again (a language-model teacher does not resume mid-run)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**{k: v for k, v in metrics.items() if k != "history"}, "checkpoint": str(out)}


def _batch(dataset: TokenDataset, split: str, rows: np.ndarray, device: torch.device):
    w = dataset.windows_at(split, rows)
    return (torch.from_numpy(w["ids"]).to(device), torch.from_numpy(w["mask"]).to(device),
            torch.from_numpy(w["segments"] >= 0).long().to(device))


def _nll(model, ids: torch.Tensor, mask: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over the masked positions (position j predicts ids[j + 1])."""
    logits = model(input_ids=ids, attention_mask=real).logits[:, :-1]
    keep = mask[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits[keep].float(), ids[:, 1:][keep], reduction="sum")
    return loss, int(keep.sum())


@torch.inference_mode()
def perplexity(model, dataset: TokenDataset, split: str, device: torch.device) -> float:
    """exp(mean NLL of the true next tokens over ``split``'s masked positions)."""
    model.eval()
    total, count = 0.0, 0
    n = len(dataset.splits[split])
    for a in range(0, n, EVAL_BATCH):
        loss, k = _nll(model, *_batch(dataset, split, np.arange(a, min(n, a + EVAL_BATCH)), device))
        total, count = total + float(loss), count + k
    return float(math.exp(total / max(count, 1)))


def _fit(model, dataset: TokenDataset, cfg: TeacherConfig, device: torch.device, progress: bool) -> dict:
    from pipeline.teacher_training import _clock

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(dataset.splits["train"])
    steps = -(-n // cfg.batch_size)
    best, best_epoch, best_state, history = math.inf, 0, None, []
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        total, count = 0.0, 0
        for step in range(steps):
            loss, k = _nll(model, *_batch(dataset, "train", order[step * cfg.batch_size:
                                                                    (step + 1) * cfg.batch_size], device))
            opt.zero_grad(set_to_none=True)
            (loss / max(k, 1)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # a tiny LM spikes early
            opt.step()
            total, count = total + float(loss.detach()), count + k
        val = perplexity(model, dataset, "val", device)
        history.append({"epoch": epoch + 1, "train_loss": round(total / max(count, 1), 6),
                        "val_perplexity": round(val, 4)})
        if val < best:
            best, best_epoch = val, epoch
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        if progress:
            elapsed = time.perf_counter() - started
            eta = elapsed / (epoch + 1) * (cfg.epochs - epoch - 1)
            print(f"teacher {LM_ARCH}: epoch {epoch + 1}/{cfg.epochs}  loss {total / max(count, 1):.4f}  "
                  f"val ppl {val:.2f}  best {best:.2f} (epoch {best_epoch + 1})  elapsed "
                  f"{_clock(elapsed)}  eta {_clock(eta)}", file=sys.stderr)
    if best_state is None:  # every epoch's perplexity was nan or inf
        raise KdError(f"the language-model teacher diverged (val perplexity {val}); pass a smaller "
                      f"lr (now lr={cfg.lr:g}, e.g. lr={cfg.lr / 10:g})")
    return {"best_val": best, "best_epoch": best_epoch, "best_state": best_state, "history": history}
