"""The report plots stay readable at page width: the passkey heatmap and bench.kernels' ratios
are grids, not strips (a 3150x400 strip of seven panels was unreadable)."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")


def _size(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def test_passkey_heatmap_of_five_summaries_is_a_grid(tmp_path):
    from trainer.eval_report import plot_summaries

    grid = {"lengths": [512, 1024], "mean": [0, 0], "depths": [0.1, 0.5, 0.9], "accuracy": [[0, 0.5, 1], [1, 0, 0]]}
    names = ["extend_start", "extend", "transfer_start", "transfer", "lora"]
    files = plot_summaries({n: {"val_loss": 1.0, "passkey": grid} for n in names}, str(tmp_path))
    w, h = _size(files[-1])
    assert w / h < 2.5 and w <= 1400, (w, h)


def test_kernel_plot_of_seven_panels_is_a_grid(tmp_path):
    from bench.kernels import plot

    rows = []
    for op, mask, hkv in [("softmax", m, k) for m in ("causal", "docs") for k in (2, 4)] + [
        ("linear", "nodecay", 4),
        ("linear", "scalar", 4),
        ("train_step", "causal", 4),
    ]:
        for n in (2048, 4096):
            rows += [
                dict(op=op, mask=mask, kv_heads=hkv, seq_len=n, impl=i, ratio=r) for i, r in (("ours", 1), ("ref", 0.9))
            ]
    plot(rows, str(tmp_path / "k.png"))
    w, h = _size(tmp_path / "k.png")
    assert w / h < 2 and w <= 1600, (w, h)
