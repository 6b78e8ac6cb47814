"""Training rows from prepared shards: packing invariants (stream: no token dropped; best_fit:
whole documents, only padding added), attention within documents, mixture weights realised,
exact resume mid-epoch (in process and with DataLoader workers), clear errors."""

import io
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trainer.data.prepared import (
    DocStream,
    Permutation,
    PreparedLoader,
    RowPlanner,
    _mix,
    _mix_np,
    build_prepared_loaders,
    build_row,
    check_config,
)
from trainer.data.shards import PreparedCorpus, PreparedDataError
from trainer.data.tokenizer import ByteTokenizer
from trainer.prepare import prepare

TOK = ByteTokenizer()


def _corpus(tmp_path, name, n, lo, hi, seed=0, letter="a"):
    """A prepared directory of ``n`` documents of random lengths in [lo, hi) characters."""
    rng = np.random.default_rng(seed)
    texts = ["".join(rng.choice(list(letter + "bcdefgh \n"), int(k))) for k in rng.integers(lo, hi, n)]
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare([str(src)], str(tmp_path / name), workers=0, shard_bytes=2000, progress=False)
    return str(tmp_path / name), texts


def _cfg(**kw):
    base = dict(
        source="prepared",
        paths=[],
        sources=[],
        seq_len=32,
        micro_batch=2,
        val_fraction=0.1,
        seed=0,
        packing="stream",
        num_workers=0,
        long_ratio=None,
        passkey_fraction=0.0,
        mqar_fraction=0.0,
        copy_fraction=0.0,
    )
    return SimpleNamespace(**{**base, **kw})


def _ext(texts, g):
    return TOK.encode(texts[g]) + [TOK.eos_id]


def test_hash_and_permutation():
    x = np.arange(0, 5000, 7, dtype=np.uint64) * np.uint64(123456789)
    assert [int(v) for v in _mix_np(x)] == [_mix(int(v)) for v in x]
    for n in (1, 2, 3, 17, 64, 1000):
        p = Permutation(n, seed=5)
        assert sorted(p(i) for i in range(n)) == list(range(n))
    assert [Permutation(1000, 1)(i) for i in range(10)] != [Permutation(1000, 2)(i) for i in range(10)]


def _saved(state) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def _drawn(planner, order=None):
    """Wrap each stream's next_doc to record the documents drawn, in order (into ``order``)."""
    order = [] if order is None else order
    for s, st in enumerate(planner.streams):

        def wrapped(st=st, s=s, f=st.next_doc):
            g = f()
            order.append((s, g))
            return g

        st.next_doc = wrapped
    return order


def _check_row(row, n):
    x, y, pos, cu = row["input_ids"], row["labels"], row["positions"], row["cu_seqlens"]
    assert x.shape == y.shape == pos.shape == (n,) and cu.dtype == torch.int32
    assert cu[0] == 0 and cu[-1] == n and bool((cu[1:] > cu[:-1]).all())
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert pos[a:b].tolist() == list(range(b - a))
        if b == n and bool((y[a:b] == -100).all() and (x[a:b] == TOK.eos_id).all()):
            continue  # best_fit's padding: inputs eos, never a label
        eos = (x[a:b] == TOK.eos_id).nonzero().flatten().tolist()
        assert all(e == b - a - 1 for e in eos)  # an eos only ends a segment: none crosses documents
    assert torch.equal(y[x == TOK.eos_id], torch.full_like(y[x == TOK.eos_id], -100))


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_stream_packing_drops_no_token(tmp_path, seq_len):
    path, texts = _corpus(tmp_path, "c", 30, 0, 90)
    corpus = PreparedCorpus([path])
    st = DocStream(corpus, "train", 0.1, 3)
    planner = RowPlanner([st], [1.0], seq_len, "stream")
    order = _drawn(planner)
    rows = [build_row(planner.next_plan(), [corpus], seq_len) for _ in range(3 * corpus.n_tokens // seq_len + 3)]
    for r in rows:
        _check_row(r, seq_len)
        assert (r["labels"] == -100).sum() == (r["input_ids"] == TOK.eos_id).sum()  # no padding
    stream = torch.cat([r["input_ids"] for r in rows]).tolist()
    expect = [t for _, g in order for t in _ext(texts, g)]
    assert stream == expect[: len(stream)]  # every token, in order, nothing dropped
    labels = torch.cat([r["labels"] for r in rows]).tolist()
    assert all(lab in (-100, nxt) for lab, nxt in zip(labels, stream[1:]))
    docs = [g for _, g in order]
    per_epoch = st.docs  # each epoch: every train document once
    assert sorted(docs[:per_epoch]) == sorted(g for g in range(corpus.n_docs) if st.in_split(g))


def test_best_fit_keeps_documents_whole(tmp_path):
    n = 64
    path, texts = _corpus(tmp_path, "c", 200, 0, 150)
    corpus = PreparedCorpus([path])
    planner = RowPlanner([DocStream(corpus, "train", 0.1, 0)], [1.0], n, "best_fit")
    order = _drawn(planner)
    pieces = {}
    for i in range(400):
        if i == 200:  # resume half way: the waiting documents travel in the state
            sd = planner.state_dict()
            assert planner.pool and sd["pool"]
            planner = RowPlanner([DocStream(corpus, "train", 0.1, 0)], [1.0], n, "best_fit")
            planner.load_state_dict(torch.load(_saved(sd), weights_only=True))
            _drawn(planner, order)
        plan = planner.next_plan()
        row = build_row(plan, [corpus], n)
        _check_row(row, n)
        t = 0
        for _, g, a, b in plan:  # the row holds exactly these document ranges, then padding
            ext = _ext(texts, g) + [-100]
            assert row["input_ids"][t : t + b - a].tolist() == ext[a:b]
            assert row["labels"][t : t + b - a].tolist() == ext[a + 1 : b + 1]
            pieces.setdefault(g, []).append((a, b))
            t += b - a
        assert (row["labels"][t:] == -100).all() and sum(b - a for _, _, a, b in plan) == t
    pending = [(g, start, start + length) for length, _, _, g, start in planner.pool]
    pending += [(g, a, b) for _, g, a, b in planner.ready]
    for g, a, b in pending:
        pieces.setdefault(g, []).append((a, b))
    for g in set(g for _, g in order):  # every drawn copy placed whole or still waiting: none dropped
        length = len(_ext(texts, g))
        assert sum(b - a for a, b in pieces[g]) == length * sum(1 for _, x in order if x == g)
        assert all((a, b) == (0, length) for a, b in pieces[g]) or length > n  # only long ones are cut
    m = PreparedLoader(planner, [corpus]).metrics()
    assert 0 < m["data_cut_share"] < 0.6 and 0 <= m["data_pad_share"] < 0.2


def test_grouped_batches_rows_of_similar_work_into_steps(tmp_path):
    """grouped: best_fit's rows, window by window, reordered so that each step's rows are
    consecutive in attention work (no two steps of a window interleave), the steps in a seeded
    order; fewer waits for the busiest rank of a step than best_fit (bench.packing)."""
    from bench.packing import measure
    from trainer.data.prepared import GROUP_STEPS

    n, group = 96, 3
    path, _ = _corpus(tmp_path, "c", 300, 0, 100)  # a few longer than a row: cut as best_fit cuts them
    corpus = PreparedCorpus([path])

    def work(plan):
        return sum((b - a) ** 2 for _, _, a, b in plan)

    ref = RowPlanner([DocStream(corpus, "train", 0.1, 0)], [1.0], n, "best_fit")
    grouped = RowPlanner([DocStream(corpus, "train", 0.1, 0)], [1.0], n, "grouped", group, seed=5)
    window = GROUP_STEPS * group
    orders, windows = [], []
    for _ in range(2):
        expect = [ref.next_plan() for _ in range(window)]
        got = [grouped.next_plan() for _ in range(window)]
        assert sorted(got) == sorted(expect)  # the same rows: same cuts, same padding
        steps = [[work(p) for p in got[i : i + group]] for i in range(0, window, group)]
        for i, x in enumerate(steps):
            for y in steps[i + 1 :]:
                assert max(x) <= min(y) or max(y) <= min(x)  # steps do not interleave in work
        assert len({w for s in steps for w in s}) > group  # (the corpus gives rows of different work)
        orders.append([max(s) for s in steps])
        windows.append(got)
    assert orders[0] != sorted(orders[0], reverse=True)  # steps shuffled, not sorted by work
    assert (grouped.pad, grouped.cut, grouped.docs) == (ref.pad, ref.cut, ref.docs)
    again = RowPlanner([DocStream(corpus, "train", 0.1, 0)], [1.0], n, "grouped", group, seed=5)
    assert [again.next_plan() for _ in range(2 * window)] == windows[0] + windows[1]  # deterministic per seed
    other = RowPlanner([DocStream(corpus, "train", 0.1, 0)], [1.0], n, "grouped", group, seed=6)
    assert [other.next_plan() for _ in range(window)] != windows[0]
    waits = {p: measure(corpus, n, p, dp=4, cp=1) for p in ("best_fit", "grouped")}
    assert waits["grouped"]["dp_wait"] < waits["best_fit"]["dp_wait"]
    assert waits["grouped"]["pad_pct"] == waits["best_fit"]["pad_pct"]


def test_mixture_weights_are_realised_and_deterministic(tmp_path):
    a, _ = _corpus(tmp_path, "a", 60, 10, 200, seed=1)
    b, _ = _corpus(tmp_path, "b", 60, 50, 400, seed=2)
    sources = [{"name": "a", "paths": [a], "weight": 0.7}, {"name": "b", "paths": [b], "weight": 0.3}]
    for packing in ("stream", "best_fit", "grouped"):
        train, _ = build_prepared_loaders(_cfg(sources=sources, packing=packing), TOK, 0, 1)
        first = [next(train) for _ in range(800)]  # best_fit's pool (256 documents) lags the mix
        shares = train.metrics()
        assert shares["data_share/a"] == pytest.approx(0.7, abs=0.02), (packing, shares)
        again, _ = build_prepared_loaders(_cfg(sources=sources, packing=packing), TOK, 0, 1)
        assert all(torch.equal(x["input_ids"], next(again)["input_ids"]) for x in first[:20])
        other, _ = build_prepared_loaders(_cfg(sources=sources, packing=packing, seed=1), TOK, 0, 1)
        assert not all(torch.equal(x["input_ids"], next(other)["input_ids"]) for x in first[:20])


def test_long_documents_are_upsampled(tmp_path):
    path, _ = _corpus(tmp_path, "c", 200, 10, 300, seed=4)
    corpus = PreparedCorpus([path])
    for ratio in (0.3, 0.8):
        st = DocStream(corpus, "train", 0.1, 0, long_ratio=ratio, long_min_tokens=200)
        lengths = [corpus.doc_len(st.next_doc()) for _ in range(20 * st.docs)]
        share = sum(x for x in lengths if x >= 200) / sum(lengths)
        assert share == pytest.approx(ratio, abs=0.04)


@pytest.mark.parametrize("packing", ["stream", "best_fit", "grouped"])
@pytest.mark.parametrize("workers,dp_rank,dp_size", [(0, 0, 1), (2, 1, 2)])
def test_resume_mid_epoch_is_exact(tmp_path, packing, workers, dp_rank, dp_size):
    path, _ = _corpus(tmp_path, "c", 40, 0, 120)

    def loader():
        return build_prepared_loaders(_cfg(paths=[path], packing=packing, num_workers=workers), TOK, dp_rank, dp_size)[
            0
        ]

    k, m = 7, 40
    full = loader()
    expect = [next(full) for _ in range(k + m)]
    assert full.planner.streams[0].epoch >= 1  # crossed an epoch
    first = loader()
    [next(first) for _ in range(k)]
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    second = loader()
    second.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for a, b in zip([next(second) for _ in range(m)], expect[k:]):
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert second.state_dict() == full.state_dict()
    if workers:  # the workers' batches are the in-process ones
        plain = build_prepared_loaders(_cfg(paths=[path], packing=packing), TOK, dp_rank, dp_size)[0]
        assert all(torch.equal(next(plain)["input_ids"], e["input_ids"]) for e in expect)


def test_val_split_is_disjoint_and_natural(tmp_path):
    path, _ = _corpus(tmp_path, "c", 50, 0, 50)
    corpus = PreparedCorpus([path])
    tr, va = DocStream(corpus, "train", 0.2, 0), DocStream(corpus, "val", 0.2, 0)
    assert tr.docs + va.docs == 50 and va.docs > 0
    assert not {tr.next_doc() for _ in range(tr.docs)} & {va.next_doc() for _ in range(va.docs)}


def test_bad_settings_raise(tmp_path):
    path, _ = _corpus(tmp_path, "c", 5, 1, 20)
    with pytest.raises(ValueError, match="data.packing='bestfit' is unknown"):
        check_config(_cfg(paths=[path], packing="bestfit"))
    with pytest.raises(ValueError, match="data.sources needs prepared data: set data=prepared"):
        check_config(_cfg(source="files", sources=[{"paths": [path]}]))
    check_config(_cfg(source="stdlib", packing="best_fit"))  # text sources pack whole too (trainer/data/planned.py)
    with pytest.raises(ValueError, match="data.packing=grouped does not apply to data=sft"):
        check_config(_cfg(source="sft", packing="grouped"))
    with pytest.raises(ValueError, match="data.sources\\[0\\] has \\['wieght'\\]"):
        check_config(_cfg(sources=[{"paths": [path], "wieght": 2}]))
    with pytest.raises(ValueError, match="data.sources\\[0\\].weight=0.0 must be > 0"):
        check_config(_cfg(sources=[{"paths": [path], "weight": 0}]))
    with pytest.raises(PreparedDataError, match="data.paths has '/nonexistent', which is not a directory"):
        check_config(_cfg(paths=["/nonexistent"]))
    with pytest.raises(ValueError, match="give data.paths or data.sources, not both"):
        check_config(_cfg(paths=[path], sources=[{"paths": [path]}]))
    with pytest.raises(ValueError, match="long_ratio and long_min_tokens per entry of data.sources"):
        check_config(_cfg(paths=[path], long_ratio=0.5))
    train, _ = build_prepared_loaders(_cfg(paths=[path]), TOK, 0, 1)
    sd = train.state_dict()
    other, _ = build_prepared_loaders(_cfg(paths=[path], seq_len=16), TOK, 0, 1)
    with pytest.raises(ValueError, match="resume with the same data settings"):
        other.load_state_dict(sd)
    grouped = build_prepared_loaders(_cfg(paths=[path], packing="grouped"), TOK, 0, 2)[0].state_dict()
    with pytest.raises(ValueError, match="with packing=grouped the same dp x data.micro_batch"):
        build_prepared_loaders(_cfg(paths=[path], packing="grouped"), TOK, 0, 1)[0].load_state_dict(grouped)


@pytest.mark.e2e
@pytest.mark.gloo
def test_training_from_prepared_data_resumes_bit_exact(tmp_path):
    """dp=2 ranks, a two-source mixture, best_fit rows: stopping and resuming gives the
    uninterrupted run's losses (the data position is in the checkpoint); the evaluation reports
    each source's held-out loss."""
    from parallel.spawn import run_distributed
    from tests.test_train_e2e import _train

    a, _ = _corpus(tmp_path, "a", 60, 0, 200, seed=1)
    b, _ = _corpus(tmp_path, "b", 40, 0, 300, seed=2, letter="z")
    common = [
        "data=prepared",
        f"data.sources=[{{name: a, paths: [{a}], weight: 0.6}}, {{name: b, paths: [{b}], weight: 0.4}}]",
        "data.packing=best_fit",
        "data.num_workers=1",
        "trainer.steps=6",
        "optim.warmup_steps=2",
    ]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    full = run_distributed(_train, 2, common + [f"trainer.run_dir={a}"])
    first = run_distributed(_train, 2, common + [f"trainer.run_dir={b}", "trainer.stop_after=3"])
    second = run_distributed(_train, 2, common + [f"trainer.run_dir={b}"])
    assert first[0]["step"] == 3 and second[0]["step"] == 6
    assert first[0]["history"] + second[0]["history"] == full[0]["history"]
    evals = [m for m in map(json.loads, open(os.path.join(a, "metrics.jsonl"))) if "val_loss" in m]
    assert len(evals) >= 2
    for m in evals:  # the held-out loss of each source of the mixture, around the overall one
        assert min(m["val_loss/a"], m["val_loss/b"]) <= m["val_loss"] <= max(m["val_loss/a"], m["val_loss/b"])


def test_mixture_composes_from_an_override(tmp_path):
    from tests.test_configs import _compose
    from trainer.config import validate

    a, _ = _corpus(tmp_path, "a", 5, 1, 20)
    b, _ = _corpus(tmp_path, "b", 5, 1, 20)
    first = f"{{name: a, paths: [{a}], weight: 0.4, long_ratio: 0.5, long_min_tokens: 8}}"
    ov = f"data.sources=[{first}, {{name: b, paths: [{b}]}}]"
    cfg = _compose(["data=prepared", ov])
    validate(cfg, world_size=1)
    assert [s["name"] for s in cfg.data.sources] == ["a", "b"]
    with pytest.raises(ValueError, match="data=prepared needs data.paths .* or data.sources"):
        validate(_compose(["data=prepared"]), world_size=1)
