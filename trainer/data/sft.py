"""Prompt/completion data (``data.source=sft``): examples, chat rendering, and packing with the
loss only on completions, carrying the segments the data masks need (data.mask).

Examples come from jsonl files (``data.paths``), one per line, in one of two forms:

    {"prompt": "What is 2 + 3?", "completion": "5"}            completion: a string or a list of
                                                                strings (several completions)
    {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}

or, with no paths, from a generated set (``generated_examples``: arithmetic with several
phrasings of each answer, copy and reverse prompts). A chat example's prompt is every message but
the last (an assistant message, the completion) rendered through the tokenizer's chat template
with the generation prompt; a tokenizer without one (the byte tokenizer) uses ``FALLBACK_TEMPLATE``:

    <|user|>\\n{content}\\n<|assistant|>\\n{completion}        (one "<|role|>\\n{content}\\n" per message)

Packing (``SFTPacked``): each *unit* is whole (never cut by a row end), packed greedily in a
seeded order per epoch; a row's tail that fits no further unit is padding (eos tokens, no loss).
A unit under data.mask=causal or prefix_lm is one prompt and one completion (an example with
several completions gives several units); under shared_question it is the prompt and all its
completions, each completion opening with the prompt's last token (positions continuing the
prompt's), so each completion's first token is predicted from the prompt alone, exactly as in its
own prompt + completion sequence. Labels: the next token where it is a completion token (or the
eos ending it), -100 elsewhere (prompts, a unit's last token, padding): the packed-data convention
(trainer/data/packing.py). Per row, besides input_ids / labels / positions [N] and cu_seqlens
(one document per unit and one for the padding):
  segments [s+1] int32  starts of the prompt / completion / text segments, then N
  roles    [s]   int64  models.ops.attention.segments TEXT / PROMPT / COMPLETION
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict

import torch

from models.ops.attention.segments import COMPLETION, PROMPT, TEXT
from trainer.data.sources import TextFilesSource, _select

FALLBACK_TEMPLATE = "<|{role}|>\n{content}\n"


# ----------------------------------------------------------------------------- examples
def generated_examples(n: int, seed: int = 0) -> list[dict]:
    """``n`` seeded prompt/completion examples: sums and products (three phrasings of the answer:
    several completions of one prompt), copying and reversing random words."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a, b, op = rng.randint(0, 999), rng.randint(0, 999), rng.choice("+*")
            r = a + b if op == "+" else a * b
            out.append(
                {
                    "prompt": f"Q: What is {a} {op} {b}?\nA:",
                    "completion": [f" {r}", f" {a} {op} {b} = {r}", f" It is {r}."],
                }
            )
        else:
            words = " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(4))
            task, answer = ("Copy", words) if kind == 1 else ("Reverse", words[::-1])
            out.append({"prompt": f"{task}: {words}\nA:", "completion": f" {answer}"})
    return out


def read_examples(paths: list[str], split: str, val_fraction: float) -> list[dict]:
    """The examples of ``split`` from jsonl files (split by line, as TextFilesSource splits)."""
    files = [f for given in paths for f in TextFilesSource._files(given)]
    out, keys = [], []
    for path, rel in files:
        if not path.endswith(".jsonl"):
            raise ValueError(f"data.source=sft reads .jsonl files: data.paths has {path}")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    out.append(_parse(line, f"{path}:{lineno}"))
                    keys.append(f"{rel}:{lineno}")
    if not out:
        raise ValueError(f"data.paths={list(paths)!r} holds no jsonl examples: fix the paths")
    return [out[i] for i in _select(keys, split, val_fraction)]


def _parse(line: str, where: str) -> dict:
    want = 'each line must be {"prompt": str, "completion": str or [str, ...]} or {"messages": [...]}'
    try:
        ex = json.loads(line)
    except ValueError:
        raise ValueError(f"{where}: not JSON: {want}") from None
    if isinstance(ex, dict) and isinstance(ex.get("messages"), list) and ex["messages"]:
        last = ex["messages"][-1]
        if not (isinstance(last, dict) and last.get("role") == "assistant" and len(ex["messages"]) >= 2):
            raise ValueError(f"{where}: a chat example must end with an assistant message (the completion)")
        return {"messages": ex["messages"]}
    if isinstance(ex, dict) and isinstance(ex.get("prompt"), str) and "completion" in ex:
        c = ex["completion"]
        if isinstance(c, str) or (isinstance(c, list) and c and all(isinstance(x, str) for x in c)):
            return {"prompt": ex["prompt"], "completion": c}
    raise ValueError(f"{where}: {want}")


def n_completions(example: dict) -> int:
    c = example.get("completion")
    return len(c) if isinstance(c, list) else 1


def render(example: dict, tokenizer) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [ids of each completion + eos])."""
    if "messages" in example:
        prompt, completions = _render_chat(example["messages"], tokenizer)
    else:
        prompt, c = example["prompt"], example["completion"]
        completions = [c] if isinstance(c, str) else list(c)
    eos = tokenizer.eos_id
    return tokenizer.encode(prompt), [tokenizer.encode(c) + [eos] for c in completions]


def _render_chat(messages: list[dict], tokenizer) -> tuple[str, list[str]]:
    hf = getattr(tokenizer, "tok", None)
    if hf is not None and getattr(hf, "chat_template", None):
        prompt = hf.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = hf.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template renders the conversation differently from its prompt")
        return prompt, [full[len(prompt) :]]
    prompt = "".join(FALLBACK_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages[:-1])
    return prompt + "<|assistant|>\n", [messages[-1]["content"]]


# ----------------------------------------------------------------------------- units
def unit(prompt: list[int], completions: list[list[int]], shared: bool, seq_len: int):
    """One packed unit as (ids, labels, positions, [(role, length), ...]), fitted into
    ``seq_len`` tokens (trailing completions dropped, then the last one cut); None when the prompt
    leaves no room for a completion token."""
    if shared:
        if len(prompt) < 2:
            return None
        q, answers = prompt[:-1], [[prompt[-1]] + c for c in completions]
    else:
        if not prompt:
            return None
        q, answers = prompt, completions
    while len(answers) > 1 and len(q) + sum(map(len, answers)) > seq_len:
        answers = answers[:-1]
    room = seq_len - len(q) - sum(map(len, answers[:-1]))
    if room < 2:
        return None
    answers[-1] = answers[-1][:room]
    ids, labels, positions, segs = list(q), [-100] * len(q), list(range(len(q))), [(PROMPT, len(q))]
    for a in answers:
        ids += a
        labels += a[1:] + [-100]
        positions += range(len(q), len(q) + len(a)) if shared else range(len(positions), len(positions) + len(a))
        segs.append((COMPLETION, len(a)))
    if not shared:  # the prompt's last token predicts the completion's first
        labels[len(q) - 1] = answers[0][0]
    return ids, labels, positions, segs


class SFTPacked:
    """Deterministic, resumable, endless rows of whole units (module docstring); the interface of
    trainer.data.packing.PackedDataset (``next_row``, ``skip_row``, ``rows``, state dicts)."""

    def __init__(self, examples: list[dict], tokenizer, seq_len: int, mask: str = "causal", seed: int = 0):
        if not examples:
            raise ValueError("data.source=sft has no examples for this split: add examples or change data.val_fraction")
        self.examples, self.tokenizer, self.seq_len, self.seed = examples, tokenizer, seq_len, seed
        self.shared = mask == "shared_question"
        counts = [1 if self.shared else n_completions(e) for e in examples]
        self.units = [(i, c) for i, n in enumerate(counts) for c in range(n)]  # (example, completion)
        self.cursor, self.rows, self.skipped = (0, 0), 0, 0
        self._perm_of: tuple[int, list[int]] | None = None
        self._cache: OrderedDict = OrderedDict()

    def _perm(self, epoch: int) -> list[int]:
        if self._perm_of is None or self._perm_of[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm_of = (epoch, torch.randperm(len(self.units), generator=g).tolist())
        return self._perm_of[1]

    def _unit(self, cursor):
        e, j = cursor
        key = self._perm(e)[j]
        if key not in self._cache:
            i, c = self.units[key]
            prompt, completions = render(self.examples[i], self.tokenizer)
            if not self.shared:
                completions = completions[c : c + 1] or completions[:1]
            self._cache[key] = unit(prompt, completions, self.shared, self.seq_len)
            if len(self._cache) > 64:
                self._cache.popitem(last=False)
        return self._cache[key]

    def _advance(self, cursor):
        e, j = cursor
        return (e, j + 1) if j + 1 < len(self.units) else (e + 1, 0)

    def next_row(self) -> dict:
        n, eos = self.seq_len, self.tokenizer.eos_id
        ids, labels, positions, segs, docs = [], [], [], [], [0]
        for _ in range(2 * len(self.units) + 1):  # every unit may be skipped: stop somewhere
            u = self._unit(self.cursor)
            if u is None:
                self.skipped += 1
            elif len(ids) + len(u[0]) > n:
                break
            else:
                ids, labels, positions, segs = ids + u[0], labels + u[1], positions + list(u[2]), segs + u[3]
                docs.append(len(ids))
            self.cursor = self._advance(self.cursor)
        if not ids:
            raise ValueError(
                f"no prompt/completion example fits data.seq_len={n} with a completion token: raise data.seq_len"
            )
        pad = n - len(ids)
        if pad:
            ids, labels, positions = ids + [eos] * pad, labels + [-100] * pad, positions + list(range(pad))
            segs.append((TEXT, pad))
            docs.append(n)
        starts = [0]
        for _, length in segs:
            starts.append(starts[-1] + length)
        self.rows += 1
        return {
            "input_ids": torch.tensor(ids, dtype=torch.int64),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "positions": torch.tensor(positions, dtype=torch.int64),
            "cu_seqlens": torch.tensor(docs, dtype=torch.int32),
            "segments": torch.tensor(starts, dtype=torch.int32),
            "roles": torch.tensor([r for r, _ in segs], dtype=torch.int64),
        }

    def skip_row(self) -> None:
        """Advance past one row (rows dealt to other dp ranks)."""
        self.next_row()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.next_row()

    def state_dict(self) -> dict:
        now = {"seed": self.seed, "seq_len": self.seq_len, "num_units": len(self.units)}
        return {"epoch": self.cursor[0], "unit": self.cursor[1], "rows": self.rows, **now}

    def load_state_dict(self, sd: dict) -> None:
        now = {"seed": self.seed, "seq_len": self.seq_len, "num_units": len(self.units)}
        saved = {k: sd.get(k) for k in now}
        if saved != now:
            raise ValueError(
                f"the data loader state was saved with {saved} but the data is now {now}: resume with the "
                "same data settings (data.seq_len, data.seed, data.paths, data.mask, data.val_fraction)"
            )
        self.cursor, self.rows = (int(sd["epoch"]), int(sd["unit"])), int(sd["rows"])


def build_sft_datasets(d, tokenizer) -> tuple[SFTPacked, SFTPacked]:
    """(train, val) datasets for the DataConfig ``d`` (data.source=sft)."""

    def examples(split):
        if d.paths:
            return read_examples(list(d.paths), split, d.val_fraction)
        every = generated_examples(d.sft_examples, d.seed)
        keys = [f"generated:{i}" for i in range(len(every))]
        return [every[i] for i in _select(keys, split, d.val_fraction)]

    train = SFTPacked(examples("train"), tokenizer, d.seq_len, d.mask, d.seed)
    val = SFTPacked(examples("val"), tokenizer, d.seq_len, d.mask, d.seed + 1)
    return train, val
