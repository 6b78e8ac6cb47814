"""The bytes a block keeps for backward, traced rather than listed by hand.

Every mixer saves its own intermediates (rotary inputs, feature maps, gates, a window branch's
q / k / v / o and log-sum-exp, a linear branch's chunked tensors), so a hand-written list per
mixer drifts from the code. Instead one block of the model is run forward on CPU at small widths
under ``torch.autograd.graph.saved_tensors_hooks`` and the storages autograd saves are summed
(``saved_storage_bytes``; each storage once, parameters excluded).

The saved bytes of one row are affine in the model width ``dim`` and the MLP width ``ffn`` (at the
real heads, head dim and mixer options) and quadratic in the row's tokens ``T`` (the T^2 term:
cores that keep dense [T, T] scores, e.g. landmark attention today):

    bytes(dim, ffn, T) = s T^2 + l T + r,   each of s, l, r = x * dim + y * ffn + z

so nine probes, (dim, ffn) in {(64, 64), (128, 64), (64, 128)} x T in {T0, 2 T0, 3 T0}, give the
nine coefficients, once per mixer entry of the model and precision (cached), and the real sizes
are extrapolated from them; tests/test_activation_trace.py checks the extrapolation against a direct
trace at other widths and lengths, for every registered mixer. ``bf16`` / ``fp16`` probes run
under CPU bf16 autocast (the trainer's precision=bf16), so fp32 statistics (norms, log-sum-exp)
count 4 bytes; GPU kernels that save other tensors than the CPU path (fla's chunk kernels) are
not traced.
"""

from __future__ import annotations

import dataclasses

import torch

PROBE_TOKENS = 128  # T0: a multiple of the block and chunk sizes a mixer uses by default (16-128)
_WIDTHS = ((64, 64), (128, 64), (64, 128))  # (dim, ffn) of the probes


def saved_storage_bytes(skip=()):
    """(box, hooks): inside ``hooks``, box["bytes"] sums the storages of the tensors autograd
    saves for backward, each storage once (views and repeated saves are not double counted);
    the storages of the tensors in ``skip`` (e.g. the parameters) are not counted, and autocast's
    copies of them (the bf16 weight a linear saves) go to box["copies"] instead, with the ids of
    the tensors copied in box["copied"]."""
    box, seen = {"bytes": 0, "copies": 0, "copied": set()}, {t.untyped_storage().data_ptr() for t in skip}
    ids = {id(t) for t in skip}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            source = _copy_of(t, ids)
            box["copies" if source is not None else "bytes"] += storage.nbytes()
            if source is not None:
                box["copied"].add(source)
        return t

    return box, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


_VIEWS = {"TBackward0", "TransposeBackward0", "ViewBackward0", "PermuteBackward0", "ExpandBackward0"}


def _copy_of(t: torch.Tensor, ids: set) -> int | None:
    """The id of the tensor (of ids ``ids``) that ``t`` is a dtype copy of, or a view of one
    (autocast's cast of a weight, which a linear saves as its transpose); None if none."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in _VIEWS:
        fn = fn.next_functions[0][0]
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return None
    sources = [id(getattr(nxt, "variable", None)) for nxt, _ in fn.next_functions if nxt is not None]
    return next((i for i in sources if i in ids), None)


def block_saved(cfg, layer: int, rows: int, tokens: int, dtype: str = "fp32") -> tuple[int, frozenset]:
    """(bytes block ``layer`` of ``cfg`` saves for backward in one forward over ``rows`` rows of
    ``tokens`` tokens, one document per row; the names of the parameters whose autocast copies
    it saves besides), measured (it builds the block: small widths only)."""
    from models.context import SingleDeviceContext
    from models.llama import Block
    from models.rope import Rotary

    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        block = Block(cfg, layer)
    x = torch.randn(rows, tokens, cfg.dim, generator=gen, requires_grad=True)
    cos, sin = Rotary(cfg.rope, cfg.hd).cos_sin(torch.arange(tokens).expand(rows, tokens), x.dtype)
    box, hooks = saved_storage_bytes(skip=[*block.parameters(), cos, sin])  # cos / sin: the model's, shared
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype in ("bf16", "fp16"))
    with hooks, autocast:
        block(x, cos, sin, SingleDeviceContext(rows, tokens))
    names = frozenset(n for n, p in block.named_parameters() if id(p) in box["copied"])
    return box["bytes"] * (2 if dtype == "fp64" else 1), names


_PROBES: dict = {}  # (repr(cfg), mixer entry, dtype) -> (the nine coefficients, weight copy bytes)


def _probed(cfg, entry: int, dtype: str) -> tuple[tuple[float, ...], int]:
    """(the nine coefficients: x, y, z of s, then of l, then of r; the bytes of autocast's weight
    copies at the real widths) of mixer entry ``entry``, probed once."""
    key = (repr(cfg), entry, dtype)
    if key not in _PROBES:
        _PROBES[key] = _probe(cfg, entry, dtype)
    return _PROBES[key]


def _probe(cfg, entry: int, dtype: str) -> tuple[tuple[float, ...], int]:
    from models.llama import Block

    t0 = PROBE_TOKENS
    per, names = [], frozenset()  # per probe width: (bytes per token^2, per token, per row)
    for dim, ffn in _WIDTHS:
        probe = dataclasses.replace(cfg, dim=dim, ffn_dim=ffn, head_dim=cfg.hd)
        (y1, names), (y2, _), (y3, _) = (block_saved(probe, entry, 1, n * t0, dtype) for n in (1, 2, 3))
        sq = (y3 - 2 * y2 + y1) / (2 * t0 * t0)  # the second difference: dense [T, T] scores
        lin = (y2 - y1) / t0 - 3 * sq * t0
        per.append((sq, lin, y1 - sq * t0 * t0 - lin * t0))
    (d0, f0), (d1, _), (_, f1) = _WIDTHS
    out = []
    for base, by_dim, by_ffn in zip(*per):  # each coefficient affine in (dim, ffn)
        a, b = (by_dim - base) / (d1 - d0), (by_ffn - base) / (f1 - f0)
        out += [a, b, base - a * d0 - b * f0]
    copies = 0
    if names:  # the copied parameters counted at the real widths, on the meta device
        with torch.device("meta"):
            block = Block(cfg, entry)
        copies = 2 * sum(p.numel() for n, p in block.named_parameters() if n in names)
    return tuple(out), copies


def block_activation_bytes(cfg, layer: int, tokens: int, dtype: str = "fp32") -> int:
    """Bytes block ``layer`` keeps for backward over one row of ``tokens`` tokens, at the real
    widths, from the cached probes of its mixer entry (module docstring); autocast's weight
    copies are not included (``block_weight_copy_bytes``)."""
    c, _ = _probed(cfg, layer % len(cfg.mixer_pattern), dtype)
    sq, lin, row = (c[i] * cfg.dim + c[i + 1] * cfg.ffn + c[i + 2] for i in (0, 3, 6))
    return round(sq * tokens * tokens + lin * tokens + row)


def block_weight_copy_bytes(cfg, layer: int, dtype: str) -> int:
    """Bytes of the bf16 weight copies block ``layer`` keeps from forward to backward under
    autocast (bf16 / fp16; 0 otherwise): 2 bytes per element of every parameter whose copy the
    probe saw saved, at the real widths. Whole weights, whatever FSDP shards: autocast casts the
    gathered weight, and the linear saves the cast."""
    if dtype not in ("bf16", "fp16"):
        return 0
    return _probed(cfg, layer % len(cfg.mixer_pattern), dtype)[1]
