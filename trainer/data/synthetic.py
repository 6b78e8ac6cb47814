"""Synthetic long-context probes: passkey retrieval, multi-query associative recall, copying."""

from __future__ import annotations

import random

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = " What is the pass key? The pass key is"
COPY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"  # copy documents' random strings
COPY_SEP = " | "  # between a copy document's repeats


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


def copy_text(
    rng: random.Random, min_chars: int = 10, max_chars: int = 40, min_repeats: int = 2, max_repeats: int = 4
) -> str:
    """A random string of letters and digits, ``min_repeats`` to ``max_repeats`` times, " | " between: every repeat is
    predictable only by copying from earlier in the context, the induction-head skill that
    retrieval needs (repeated random sequences form induction heads fast: Olsson et al., 2022)."""
    text = "".join(rng.choice(COPY_ALPHABET) for _ in range(rng.randint(min_chars, max_chars)))
    return COPY_SEP.join([text] * rng.randint(min_repeats, max_repeats))


def copy_example(tokenizer, n_chars: int, repeats: int, rng: random.Random):
    """A held-out copy document in ``copy_text``'s format: a fresh random string of ``n_chars``
    characters written ``repeats`` times, ``COPY_SEP`` between, then eos (the packer's document
    end). Returns (ids, spans): ``spans`` holds the (start, end) token range of every repeat
    after the first (the string's tokens only, never a separator or the eos): the tokens that
    only copying predicts (score ids[start:end] from the logits at start-1 .. end-2). The
    string and separator are encoded apart (with the byte tokenizer that is the training
    tokenization; a subword tokenizer may merge across them in training text)."""
    text = tokenizer.encode("".join(rng.choice(COPY_ALPHABET) for _ in range(n_chars)))
    sep = tokenizer.encode(COPY_SEP)
    ids, spans = list(text), []
    for _ in range(repeats - 1):
        ids += sep
        spans.append((len(ids), len(ids) + len(text)))
        ids += text
    return ids + [tokenizer.eos_id], spans


def _key_word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4))


def kv_recall_parts(n_pairs: int, rng: random.Random):
    """``n_pairs`` (needle, query, answer) strings of multi-query associative recall in text, the
    passkey's own wording with a named key: needle " The {word} key is NNNNN. ", query
    " What is the {word} key? The {word} key is", answer " NNNNN." (distinct 4-letter words)."""
    words: list[str] = []
    while len(words) < n_pairs:
        w = _key_word(rng)
        words += [w] if w not in words and w != "pass" else []
    keys = [rng.randint(10000, 99999) for _ in words]
    return [(f" The {w} key is {k}. ", f" What is the {w} key? The {w} key is", f" {k}.") for w, k in zip(words, keys)]


def kv_recall_text(n_chars: int, n_pairs: int, rng: random.Random) -> str:
    """A training document of about ``n_chars`` characters: filler with ``n_pairs`` needles at
    random depths, then every query and its answer in a random order (the format
    ``kv_recall_example`` evaluates)."""
    parts = kv_recall_parts(n_pairs, rng)
    order = rng.sample(range(n_pairs), n_pairs)
    tail = "".join(parts[i][1] + parts[i][2] for i in order)
    budget = max(n_chars - sum(len(p[0]) for p in parts) - len(tail), 0)
    filler = (FILLER * (budget // len(FILLER) + 1))[:budget]
    cuts = sorted(rng.randint(0, budget) for _ in parts)
    text, prev = "", 0
    for cut, (needle, _, _) in zip(cuts, parts):
        text, prev = text + filler[prev:cut] + needle, cut
    return text + filler[prev:] + tail


def kv_recall_example(tokenizer, context_len: int, n_pairs: int, rng: random.Random):
    """A prompt of exactly ``context_len`` tokens in ``kv_recall_text``'s format: filler with the
    needles at random depths, then every query with its answer. Returns (input_ids, spans):
    ``spans`` holds, per query, the (start, end) token range of its answer in ``input_ids``
    (score input_ids[start:end] from the logits at start-1 .. end-2)."""
    parts = kv_recall_parts(n_pairs, rng)
    needles = [tokenizer.encode(p[0]) for p in parts]
    order = rng.sample(range(n_pairs), n_pairs)
    tail, spans = [], []
    for i in order:
        tail += tokenizer.encode(parts[i][1])
        answer = tokenizer.encode(parts[i][2])
        spans.append((len(tail), len(tail) + len(answer)))
        tail += answer
    budget = context_len - sum(map(len, needles)) - len(tail)
    if budget < 0:
        raise ValueError(
            f"kv-recall context length {context_len} is too short for {n_pairs} pairs: they take "
            f"{context_len - budget} tokens (lower trainer.mqar_pairs or raise trainer.mqar_lengths)"
        )
    filler = _filler_ids(tokenizer, budget)
    cuts = sorted(rng.randint(0, budget) for _ in parts)
    ids, prev = [], 0
    for cut, needle in zip(cuts, needles):
        ids, prev = ids + filler[prev:cut] + needle, cut
    ids += filler[prev:]
    head = len(ids)
    ids += tail
    assert len(ids) == context_len
    return ids, [(head + a, head + b) for a, b in spans]


def _filler_ids(tokenizer, n: int) -> list[int]:
    """The first ``n`` tokens of the repeated filler."""
    reps = n // max(len(tokenizer.encode(FILLER)), 1) + 2
    ids = tokenizer.encode(FILLER * reps)
    while len(ids) < n:
        reps *= 2
        ids = tokenizer.encode(FILLER * reps)
    return ids[:n]
