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


def write_tiny_gguf(model_dir: Path, path: Path) -> Path:
    """The Llama of :func:`write_tiny_llama` (``model_dir``) written as one GGUF file at
    ``path``, as llama.cpp's converter lays it out: the config as ``llama.*`` metadata, the
    byte-level BPE as ``tokenizer.ggml.*`` (tokens, merges, control tokens, EOS/pad ids), and
    float32 tensors under GGUF names (q and k rows permuted as llama.cpp stores them; transformers
    undoes that when it loads the file). Written with the ``gguf`` package in milliseconds."""
    import json

    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    state = json.loads(tok.backend_tokenizer.to_str())
    tokens = {i: t for t, i in state["model"]["vocab"].items()}
    tokens.update({a["id"]: a["content"] for a in state["added_tokens"]})
    special = {a["id"] for a in state["added_tokens"] if a["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([tokens[i] for i in range(len(tok))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]])
    w.add_token_types([3 if i in special else 1 for i in range(len(tok))])  # 3: control
    w.add_eos_token_id(tok.eos_token_id)
    w.add_bos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)

    def permute(x: np.ndarray, heads: int) -> np.ndarray:
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(cfg.num_hidden_layers):
        for hf, name in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                         ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                         ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
                         ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{name}.weight"
    weights = model.state_dict()
    for hf, name in names.items():
        x = weights[hf].float().numpy()
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            x = permute(x, cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads)
        w.add_tensor(name, np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def corpus_documents(path: Path) -> list[str]:
    """The documents of a corpus written by :func:`write_corpus`, as tokens:PATH reads them."""
    from pipeline.data.tokens import split_documents

    return split_documents(path.read_text(encoding="utf-8"))
