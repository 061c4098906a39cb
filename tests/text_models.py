"""Offline text fixtures: a labelled corpus written by the test, a WordPiece tokenizer trained
on it (the ``tokenizers`` library, about a second), and a tiny randomly initialised BERT built
from a config, saved as a Hugging Face model directory that ``teacher=hf:DIR`` loads. Nothing
is downloaded; the real pretrained models are for bench/ and the README."""

from __future__ import annotations

import csv
import random
from pathlib import Path

# Two topics of distinct vocabulary, so a student can learn them from words alone, and a
# teacher's head can learn them from a random encoder's features.
TOPICS = {
    "spam": "win free money offer click prize cash bonus deal winner urgent claim",
    "ham": "meeting lunch report project team notes agenda review schedule budget plan office",
    "news": "election market weather sports government economy storm league vote policy",
}
FILLER = "the a of to and in is it for on with this that we you"


def write_corpus(path: Path, rows: int = 240, classes: int = 3, seed: int = 0,
                 split_column: bool = False) -> Path:
    """A CSV of ``rows`` short documents with columns text, label (and split)."""
    rng = random.Random(seed)
    names = list(TOPICS)[:classes]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"] + (["split"] if split_column else []))
        for i in range(rows):
            label = names[i % classes]
            words = rng.choices(TOPICS[label].split(), k=rng.randint(3, 9)) + \
                rng.choices(FILLER.split(), k=rng.randint(2, 30))
            rng.shuffle(words)
            split = ["train"] * 7 + ["val", "test", "test"]
            writer.writerow([" ".join(words), label] + ([split[i % 10]] if split_column else []))
    return path


def train_tokenizer(texts: list[str], vocab_size: int = 200):
    """A BERT-style WordPiece tokenizer (transformers' fast tokenizer) trained on ``texts``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size,
                                                             special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=128)


def write_tiny_bert(folder: Path, texts: list[str], seed: int = 0, hidden: int = 32,
                    layers: int = 2) -> Path:
    """A Hugging Face model directory: config.json, model.safetensors and the tokenizer's files
    of a randomly initialised ``hidden``-wide, ``layers``-deep BERT."""
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = train_tokenizer(texts)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def corpus_texts(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)]
