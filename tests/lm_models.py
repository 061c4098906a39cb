"""Offline language-model fixtures: a small English-like corpus written by the test (documents
separated by blank lines), a byte-level BPE tokenizer trained on it (the ``tokenizers`` library,
well under a second; an EOS ``<|endoftext|>`` and a pad ``<pad>``), and tiny randomly
initialised causal LMs built from a config, saved as Hugging Face model directories that
``teacher=hf:DIR`` (and ``tokenizer=DIR``) load. Nothing is downloaded; SmolLM2 is for bench/
and the README."""

from __future__ import annotations

import random
from pathlib import Path

# A toy grammar: sentences with some structure (articles before nouns, verbs agreeing), so a
# small LM learns something in an epoch or two and its perplexity falls well below uniform.
NOUNS = "cat dog bird farmer teacher child river market garden storm ship king baker".split()
VERBS = "sees finds likes follows paints builds carries watches helps visits".split()
ADJECTIVES = "old small quiet bright green busy cold happy red tall".split()
PLACES = "by the river|in the garden|at the market|under the old bridge|near the hill".split("|")
ENDINGS = [".", ".", ".", "!", "?"]


def sentence(rng: random.Random) -> str:
    def noun_phrase() -> str:
        adjective = f"{rng.choice(ADJECTIVES)} " if rng.random() < 0.5 else ""
        return f"{rng.choice(['the', 'a', 'every'])} {adjective}{rng.choice(NOUNS)}"

    words = f"{noun_phrase()} {rng.choice(VERBS)} {noun_phrase()}"
    if rng.random() < 0.4:
        words += f" {rng.choice(PLACES)}"
    return words[0].upper() + words[1:] + rng.choice(ENDINGS)


def documents(count: int = 200, seed: int = 0) -> list[str]:
    """``count`` documents of 1 to 5 sentences (some over two lines: a single newline is
    part of a document, a blank line ends it)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        sentences = [sentence(rng) for _ in range(rng.randint(1, 5))]
        if len(sentences) > 2 and rng.random() < 0.3:
            sentences[1] += "\n"
        docs.append(" ".join(sentences).replace("\n ", "\n"))
    return docs


def write_corpus(path: Path, count: int = 200, seed: int = 0) -> Path:
    """A .txt corpus: :func:`documents` separated by blank lines."""
    path.write_text("\n\n".join(documents(count, seed)) + "\n", encoding="utf-8")
    return path


def train_tokenizer(texts: list[str], vocab_size: int = 300):
    """A byte-level BPE with an EOS and a pad token (pipeline.lm_teacher's, the one
    ``kdcache teacher`` trains for a token dataset)."""
    from pipeline.lm_teacher import train_tokenizer as train

    return train(texts, vocab_size)


def write_tiny_llama(folder: Path, texts: list[str], seed: int = 0, hidden: int = 32,
                     layers: int = 2, vocab_size: int = 300) -> Path:
    """A Hugging Face model directory: config.json, model.safetensors and the tokenizer's files
    of a randomly initialised ``hidden``-wide, ``layers``-deep ``LlamaForCausalLM`` whose
    outputs are exactly the tokenizer's ``len(tokenizer)`` ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=2 * hidden,
                         max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_gpt2(folder: Path, texts: list[str], seed: int = 0, hidden: int = 32,
                    layers: int = 2, vocab_size: int = 300, padding: int = 20) -> Path:
    """A Hugging Face model directory of a random ``GPT2LMHeadModel`` whose output layer is
    *padded*: ``len(tokenizer) + padding`` outputs, as real models pad theirs (ids past
    ``len(tokenizer)`` are never real tokens)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer) + padding, n_embd=hidden, n_layer=layers,
                        n_head=2, n_positions=512, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def corpus_documents(path: Path) -> list[str]:
    """The documents of a corpus written by :func:`write_corpus`, as tokens:PATH reads them."""
    from pipeline.data.tokens import split_documents

    return split_documents(path.read_text(encoding="utf-8"))
