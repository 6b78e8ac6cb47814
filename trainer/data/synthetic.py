"""Synthetic long-context probes: passkey retrieval and multi-query associative recall."""

from __future__ import annotations

import random

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = " What is the pass key? The pass key is"


def passkey_example(tokenizer, context_len: int, depth: float, rng: random.Random):
    """A prompt of exactly ``context_len`` tokens: filler text with the needle
    "The pass key is NNNNN. Remember it. NNNNN is the pass key." at relative ``depth``
    (0 = start, 1 = just before the question), ending with the question
    "What is the pass key? The pass key is". Returns (input_ids, answer_ids) as lists;
    answer_ids encodes " NNNNN." (the continuation to score)."""
    key = rng.randint(10000, 99999)
    needle = tokenizer.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question = tokenizer.encode(QUESTION)
    budget = context_len - len(needle) - len(question)
    if budget < 0:
        raise ValueError(
            f"passkey context length {context_len} is too short: the needle and "
            f"question alone take {len(needle) + len(question)} tokens"
        )
    reps = budget // max(len(tokenizer.encode(FILLER)), 1) + 2
    filler = tokenizer.encode(FILLER * reps)
    while len(filler) < budget:
        reps *= 2
        filler = tokenizer.encode(FILLER * reps)
    filler = filler[:budget]
    cut = round(min(max(depth, 0.0), 1.0) * budget)
    ids = filler[:cut] + needle + filler[cut:] + question
    assert len(ids) == context_len
    return ids, tokenizer.encode(f" {key}.")


def mqar_example(vocab_size: int, context_len: int, num_pairs: int, rng: random.Random):
    """Multi-query associative recall, ``context_len`` tokens:
    ``k1 v1 ... kn vn  0 0 ... 0  q1 a1 ... qn an``. Keys are distinct ids from
    [1, 1+K), values ids from [1+K, vocab_size) with K = (vocab_size-1)//2, id 0 pads; the
    queries are every key once in random order, each followed by its value.
    Returns (input_ids, labels), lists of length ``context_len``: labels[t] is the value
    at every query-key position t (the next token) and -100 elsewhere."""
    n_keys = (vocab_size - 1) // 2
    if num_pairs > n_keys or vocab_size - 1 - n_keys < 1:
        raise ValueError(f"mqar: vocab_size={vocab_size} is too small for {num_pairs} distinct keys")
    if 4 * num_pairs > context_len:
        raise ValueError(f"mqar: {num_pairs} pairs need context_len >= {4 * num_pairs}")
    keys = rng.sample(range(1, 1 + n_keys), num_pairs)
    values = [rng.randrange(1 + n_keys, vocab_size) for _ in keys]
    kv = [t for pair in zip(keys, values) for t in pair]
    order = rng.sample(range(num_pairs), num_pairs)
    queries = [t for i in order for t in (keys[i], values[i])]
    ids = kv + [0] * (context_len - len(kv) - len(queries)) + queries
    labels = [-100] * context_len
    start = context_len - len(queries)
    for j, i in enumerate(order):
        labels[start + 2 * j] = values[i]
    return ids, labels


def passkey_text(n_chars: int, depth: float, rng: random.Random) -> str:
    """A passkey document of about ``n_chars`` characters for training, in the format
    ``passkey_example`` evaluates: filler, the needle at relative ``depth``, the question and
    its answer " NNNNN." (with the byte tokenizer, one token per character)."""
    key = rng.randint(10000, 99999)
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    tail = f"{QUESTION} {key}."
    budget = max(n_chars - len(needle) - len(tail), 0)
    filler = (FILLER * (budget // len(FILLER) + 1))[:budget]
    cut = round(min(max(depth, 0.0), 1.0) * budget)
    return filler[:cut] + needle + filler[cut:] + tail
