"""MFU accounting (trainer/metrics.py): attention FLOPs counted from the batch's documents and
window (each mixer's ``core_flops``), against counts done by hand."""

import pytest
import torch

from models import ModelConfig, Transformer
from models.ops.documents import causal_pairs, doc_lengths
from trainer.metrics import CPU_FLOPS_PER_THREAD, batch_flops, device_peak_flops, matmul_params, rank_batch_flops

# 2 rows of 16 tokens: row 0 packs documents of 5 and 11 tokens, row 1 holds one document that
# started in row 0's last document's place -- as the loader writes it, row starts included
CU = torch.tensor([0, 5, 16, 32], dtype=torch.int32)


def test_document_lengths_and_causal_pairs_by_hand():
    assert doc_lengths(CU, 2, 16) == [5, 11, 16]
    assert doc_lengths(torch.tensor([0, 5, 20, 32]), 2, 16) == [5, 11, 4, 12]  # a document crossing a row end
    assert doc_lengths(None, 2, 16) == [16, 16]
    assert causal_pairs([5, 11, 16]) == 15 + 66 + 136
    # window 4: a query sees its last min(i + 1, 4) keys: 1+2+3+4 (+4 per later token)
    assert causal_pairs([5, 11, 16], window=4) == (10 + 4) + (10 + 7 * 4) + (10 + 12 * 4)
    assert causal_pairs([3], window=8) == 6


@pytest.mark.parametrize("window", [None, 4])
def test_packed_batch_flops_by_hand(window):
    cfg = ModelConfig(vocab_size=100, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, sliding_window=window)
    model = Transformer(cfg)
    n_matmul = matmul_params(model)
    assert n_matmul == sum(p.numel() for p in model.parameters()) - 100 * 32  # the embedding is a lookup
    pairs = 217 if window is None else 110  # the documents above
    hand = 6 * n_matmul * 32 + 3 * 12 * 4 * 8 * pairs  # layers x 12 H D per allowed (query, key) pair
    got = batch_flops(cfg, n_matmul, doc_lengths(CU, 2, 16))
    assert got == hand
    # what counting seq_len^2 per row (one causal document per row) would give: the test must tell
    row_count = 6 * n_matmul * 32 + 3 * 12 * 4 * 8 * causal_pairs([16, 16], window)
    assert row_count != hand
    # the trainer's count: each of 2 CP ranks holds 8 of each row's 16 tokens and half the work
    local = {"input_ids": torch.zeros(2, 8, dtype=torch.int64), "cu_seqlens": CU, "seq_len": 16}
    assert rank_batch_flops(cfg, n_matmul, local, cp=2) == hand / 2


def test_tied_head_counts_the_embedding_and_mixers_differ():
    cfg = ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True)
    assert matmul_params(Transformer(cfg)) == sum(p.numel() for p in Transformer(cfg).parameters())
    lens = [5, 11, 16]
    linear = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, mixer_pattern=["linear"])
    assert batch_flops(linear, 0, lens) == 2 * 12 * 4 * 8 * 8 * 32  # flat per token: 12 H D^2
    dense = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mixer_pattern=["s2"], s2_block=16, s2_stride=1)
    sparse = ModelConfig(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mixer_pattern=["s2"], s2_block=16, s2_stride=2, s2_local=1
    )
    softmax = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    long = [64, 64]
    assert batch_flops(dense, 0, long) == batch_flops(softmax, 0, long)  # stride 1 is dense
    assert batch_flops(sparse, 0, long) < batch_flops(softmax, 0, long)
    assert batch_flops(sparse, 0, [16, 16]) == batch_flops(softmax, 0, [16, 16])  # one local block: dense


def test_device_peak():
    cpu = torch.device("cpu")
    assert device_peak_flops(cpu, 2.5) == 2.5e12
    assert device_peak_flops(cpu) == CPU_FLOPS_PER_THREAD * torch.get_num_threads()


def test_gpu_peak_by_name_and_precision():
    from trainer.metrics import gpu_peak_flops

    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12 and gpu_peak_flops("NVIDIA H100 NVL") == 835e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp32") == 67e12  # fp32 runs: the fp32 peak
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp32", tf32=True) == 989e12 / 2
    assert gpu_peak_flops("Some Future GPU") is None
