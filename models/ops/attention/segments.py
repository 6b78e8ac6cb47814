"""A data-driven mask: the prompt / completion segments a packed batch carries, as a SliceMask.

Prompt/completion data (trainer/data/sft.py) describes each batch by its *segments*: start
offsets over the flattened [B * N] batch (like ``cu_seqlens``, but finer: every prompt, every
completion and every plain-text piece is a segment; ``segments`` ends with B * N) and one role
per segment (``TEXT``, ``PROMPT``, ``COMPLETION``). A prompt opens a group; the completions after
it belong to that group; a text segment (padding, plain documents) is a group of its own. Groups
never cross a row end.

``SegmentMask(name, segments, roles)`` is hashable and has ``MaskRecipe.build``'s signature, so
the attention contexts build it once per batch and head count (``AttentionContext.slice_mask``)
and every softmax CP strategy takes it as it takes a configured mask. The description is global
(1-D, kept whole by the CP sharding), so every rank builds the same SliceMask over the whole row.

Masks (``data.mask``), through the builders of slices.py:
    causal            no SegmentMask: each prompt + completion is a packed document
    prefix_lm         per group: the prompt bidirectional, the rest causal seeing the whole prompt
                      (varlen_prefix_lm); text groups causal (prefix 0)
    shared_question   per group: the prompt causal, each completion seeing the prompt and itself
                      (causal), never a sibling (varlen_shared_question); text groups causal
"""

from __future__ import annotations

from dataclasses import dataclass

from models.ops.attention.slices import SliceMask, varlen_prefix_lm, varlen_shared_question

TEXT, PROMPT, COMPLETION = 0, 1, 2
DATA_MASKS = ("causal", "prefix_lm", "shared_question")


def row_groups(segments, roles, batch: int, seq_len: int) -> list[list[tuple[int, list[int]]]]:
    """Per row, its groups as (prompt length, [completion lengths]); a text segment is
    (its length, []). ValueError for a completion without a prompt or a segment crossing a row end."""
    starts = [int(x) for x in segments]
    roles = [int(r) for r in roles]
    if len(starts) != len(roles) + 1 or starts[0] != 0 or starts[-1] != batch * seq_len:
        raise ValueError(
            f"segments {starts[:4]}... ({len(starts)} offsets) and roles ({len(roles)}) do not describe a "
            f"[{batch}, {seq_len}] batch: segments must run from 0 to B * N with one role per segment"
        )
    rows: list[list[tuple[int, list[int]]]] = [[] for _ in range(batch)]
    for a, e, role in zip(starts, starts[1:], roles):
        row = a // seq_len
        if e <= a or (e - 1) // seq_len != row:
            raise ValueError(f"segment [{a}, {e}) is empty or crosses the end of row {row} (N={seq_len})")
        if role == COMPLETION:
            if not rows[row] or rows[row][-1][1] is None:
                raise ValueError(f"completion segment [{a}, {e}) has no prompt before it in its row")
            rows[row][-1][1].append(e - a)
        else:  # a prompt opens a group that takes completions; a text group takes none (None)
            rows[row].append((e - a, [] if role == PROMPT else None))
    return [[(q, answers or []) for q, answers in row] for row in rows]


@dataclass(frozen=True)
class SegmentMask:
    """``data.mask`` (prefix_lm | shared_question) over one batch's segments (module docstring)."""

    name: str
    segments: tuple[int, ...]
    roles: tuple[int, ...]

    def build(self, batch: int, seq_len: int, cu_seqlens=None, n_heads: int = 1) -> SliceMask:
        """The SliceMask of the [batch, seq_len] batch (``cu_seqlens``, ``n_heads``: unused, the
        segments hold the documents; the signature of MaskRecipe.build)."""
        rows = []
        for groups in row_groups(self.segments, self.roles, batch, seq_len):
            if self.name == "prefix_lm":
                lengths = [q + sum(a) for q, a in groups]
                prefixes = [q if a else 0 for q, a in groups]
                rows.append(varlen_prefix_lm(lengths, prefixes).rows[0])
            elif self.name == "shared_question":
                rows.append(varlen_shared_question(groups).rows[0])
            else:
                raise ValueError(f"data.mask={self.name!r} builds no slice mask: choose one of {DATA_MASKS[1:]}")
        rows = tuple(rows[:1] if len(set(rows)) == 1 else rows)
        return SliceMask(rows, seq_len, f"data_{self.name}")


def segment_mask(name: str, batch: dict) -> SegmentMask | None:
    """The batch's data mask for ``data.mask=name`` (None for causal). ``batch``: the collated
    batch (``segments`` [n_seg + 1], ``roles`` [n_seg]); ValueError naming data.mask when the
    data carries no prompts."""
    if name not in DATA_MASKS:
        raise ValueError(f"data.mask={name!r} is unknown: choose one of {DATA_MASKS}")
    if name == "causal":
        return None
    if "segments" not in batch or "roles" not in batch:
        raise ValueError(
            f"data.mask={name} needs prompt/completion data, but these batches carry no prompts: "
            "set data.source=sft (jsonl {prompt, completion} or {messages}) or data.mask=causal"
        )
    return SegmentMask(name, tuple(batch["segments"].tolist()), tuple(batch["roles"].tolist()))
