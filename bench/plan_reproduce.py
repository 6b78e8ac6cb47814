"""Published cluster results next to what parallel/cost_model.py predicts for them.

Each case states the published figure, its source, the setting the model is given and the
prediction; ``status`` says whether the model reproduces it (within ``TOLERANCE``) or why not.
No constant here is fitted: the hardware is the cluster profile (conf/cluster/*.yaml, sources
beside each value), the shapes are the papers' own.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from models.config import ModelConfig
from parallel.cost_model import RunSpec, layer_cost, load_cluster, step_cost

TOLERANCE = 0.10  # |predicted / published - 1| for a reproduced figure


@dataclass
class Case:
    name: str
    published: float
    predicted: float
    unit: str
    setting: str
    source: str
    expect_reproduced: bool  # the model is claimed to reproduce it (a test holds it to TOLERANCE)
    why: str = ""  # when not reproduced: the reason, stated
    assumed: str = ""  # a setting the source does not state, assumed here (the status says so)
    band: tuple = ()  # documented (lo, hi) of predicted / published for a figure not reproduced

    @property
    def tolerance(self) -> tuple:
        """The band tests/test_cost_model.py holds the ratio in: TOLERANCE around 1 for a
        reproduced figure, else ``band`` (where the stated reason puts it)."""
        return self.band or (1 - TOLERANCE, 1 + TOLERANCE)

    @property
    def ratio(self) -> float:
        return self.predicted / self.published

    @property
    def reproduced(self) -> bool:
        return abs(self.ratio - 1) <= TOLERANCE


def _cluster(conf: str, name: str):
    return load_cluster(os.path.join(conf, "cluster", f"{name}.yaml"))


def _attention_s(cluster, spec) -> float:
    """Core attention of one layer, fwd + bwd, busiest rank, communication under its overlap rule."""
    c = layer_cost(cluster, spec, 0, params=0)
    return c.time_s - c.gemm_s


def ring_flash_attn(conf: str) -> list[Case]:
    """ring-flash-attn README, "Performance Summary", batch api, fwd + bwd, 8xH800 and 8xA100:
    its benchmark (benchmark/benchmark_kvpacked_func.py) runs Llama-3-8B attention (H 32, Hkv 8,
    D 128, bf16, causal) with 8K tokens per GPU (64K in all); "theoretic" = flash_attn on one GPU's
    8K / 8, the same pairs per GPU as balanced ring attention over 64K. H800: ring_attn 10.4 iter/s
    (53.9%), zigzag_ring 17.4 (90.2%), flash_attn 154.7; A100: 6.2 (52.5%), 10.6 (89.8%).

    Modeled as longctx's ring over 8 ranks (contiguous = ring_attn, zigzag = zigzag_ring): the K/V
    transfer hides under each step's attention (NVLink), and each step's merge of the partial
    output and, in backward, the dq and dK/dV accumulations cost memory traffic at HBM bandwidth
    (cost_model.merge_seconds; the README's implementation merges the same way, fused by
    torch.jit: fewer bytes, so the model's ring is a little slower than the README's)."""
    src = "github.com/zhuzilin/ring-flash-attention README, Performance Summary (batch api, fwd+bwd)"
    cfg = ModelConfig(vocab_size=32, dim=4096, n_layers=1, n_heads=32, n_kv_heads=8, head_dim=128)
    n, p = 8 * 8192, 8
    out = []
    for gpu, plain_pub, zz_pub, ring_it, zz_it in (("h800", 53.9, 90.2, 10.4, 17.4), ("a100", 52.5, 89.8, 6.2, 10.6)):
        cl = _cluster(conf, gpu)
        ideal = _attention_s(cl, RunSpec(cfg, n, cp=1)) / p
        plain = _attention_s(cl, RunSpec(cfg, n, cp=p, strategies={"softmax": "ring"}, layout="contiguous"))
        zigzag = _attention_s(cl, RunSpec(cfg, n, cp=p, strategies={"softmax": "ring"}, layout="zigzag"))
        setting = f"{gpu} profile, Llama-3-8B attention, 8 x 8K tokens, causal, bf16"
        g = gpu.upper()
        name = f"ring-flash-attn 8x{g}:"
        out += [
            Case(f"{name} plain ring, % of ideal", plain_pub, 100 * ideal / plain, "%", setting, src, True),
            Case(f"{name} zigzag ring, % of ideal", zz_pub, 100 * ideal / zigzag, "%", setting, src, True),
            Case(f"{name} zigzag / plain speed", zz_it / ring_it, plain / zigzag, "x", setting, src, True),
        ]
        if gpu == "h800":
            single = _attention_s(cl, RunSpec(cfg, 8192, cp=1))
            out.append(
                Case(
                    "ring-flash-attn 8xH800: flash_attn on 8K, fwd+bwd iter/s",
                    154.7,
                    1 / single,
                    " it/s",
                    "h800 profile, one GPU, Llama-3-8B attention, 8K tokens, causal, bf16",
                    src,
                    False,
                    "the profile's attention rate is FlashAttention-3's on Hopper (attention_fraction 0.5); the "
                    "README runs FlashAttention-2, which the FA3 paper puts at about 35% of peak on H100, and an "
                    "8K causal call is short for either; the relative figures above do not depend on it",
                    band=(1.8, 2.1),
                )
            )
    return out


def lasp1_reference_chain(cl, cfg, n: int, p: int) -> float:
    """Seconds the reference LASP-1 adds to a step over LASP-2 (no overlap): per layer, the forward
    waits for the P - 1 ranks before it, each running its whole local op (a = the op's fwd share),
    plus a state hop (latency + H Dk Dv fp32 bytes); the backward chain runs once per step, its
    stages pipelined across layers (P - 1 backward ops and hops)."""
    from parallel.cost_model import linear_core_seconds

    a = linear_core_seconds(cl, cfg, 1, n // p, "bf16")
    per_byte, lat = cl.link(p, True)
    hop = lat + cfg.n_heads * cfg.hd * cfg.hd * 4 * per_byte
    return cfg.n_layers * (p - 1) * (a / 3 + hop) + (p - 1) * (2 * a / 3 + hop)


def lasp2(conf: str) -> list[Case]:
    """LASP-2 (Sun et al. 2025, arXiv 2502.07563, abstract and its throughput figure, as the notes
    quote it): Linear-Llama3-1B (basic linear attention), 64 A100 GPUs, batch 1: at 2048K tokens
    LASP-2 +36.6% over ring attention, +15.2% over LASP-1; at 512K +17.8% / +7.3%."""
    cl = _cluster(conf, "a100")
    base = dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, ffn_dim=8192)
    lin = ModelConfig(**base, tie_embeddings=True, mixer_pattern=["linear"])
    soft = ModelConfig(**base, tie_embeddings=True)
    src = "LASP-2, arXiv 2502.07563 (abstract; throughput figure as quoted in the notes)"
    out = []
    for n_k, vs_ring, vs_lasp1 in ((2048, 36.6, 15.2), (512, 17.8, 7.3)):
        n = n_k * 1024
        run = dict(cp=64, layout="contiguous", activation_checkpointing=False)
        t2 = step_cost(cl, RunSpec(lin, n, strategies={"linear": "lasp2"}, **run)).step_s
        t1 = t2 + lasp1_reference_chain(cl, lin, n, 64)
        ours = step_cost(cl, RunSpec(lin, n, strategies={"linear": "lasp1"}, **run)).step_s
        tr = step_cost(cl, RunSpec(soft, n, strategies={"softmax": "ring"}, **run)).step_s
        setting = f"a100 profile, Linear-Llama3-1B, {n_k}K tokens, cp 64 (8 nodes), batch 1"
        out.append(
            Case(
                f"LASP-2 over LASP-1 at {n_k}K, speed-up %",
                vs_lasp1,
                100 * (t1 / t2 - 1),
                "%",
                setting,
                src,
                False,
                "LASP-1 modeled as its reference code runs (OpenNLPLab/LASP lasp_fuse_parallel.py: a barrier, "
                "then each rank's whole linear-attention forward between receiving and sending the state, "
                "so the forward runs the 64 ranks one after another in every layer; the backward chain "
                "pipelines across layers): its cost and the step both grow as N / P and the hop latencies "
                "do not, so the predicted gain falls with N, while the paper's doubles from 512K to 2048K. "
                f"With longctx's lasp1 (summaries before the chain, only states on it) the gain is "
                f"{100 * (ours / t2 - 1):.1f}%: the published figure lies between the two readings; which "
                "LASP-1 the paper ran, and its GEMM efficiency at 8-32K tokens per GPU, are not given",
                band=(1.5, 2.0) if n_k == 2048 else (4.0, 6.0),
            )
        )
        out.append(
            Case(
                f"LASP-2 over ring attention at {n_k}K, speed-up %",
                vs_ring,
                100 * (tr / t2 - 1),
                "%",
                setting,
                src,
                False,
                "the model costs ring attention as longctx's ring (softmax-style K/V blocks around 64 "
                "ranks: quadratic work, 63 hops of 32K tokens' K/V over InfiniBand), thousands of % "
                "slower; a ring for linear attention that passes K/V and multiplies right-first would "
                "still move 63 x 268 MB per layer at 2048K (~0.7 s forward at 25 GB/s); the paper's +36.6% "
                "(+17.8% at 512K) fits neither and its ring baseline's implementation is not given",
                band=(100.0, 1000.0),
            )
        )
    return out


def distca(conf: str) -> list[Case]:
    """DistCA (Zhuang et al. 2025, arXiv 2510.18121, abstract): up to 1.35x end-to-end throughput
    on 512 H200 at up to 512K context over its baselines, the strongest being WLB-LLM (variable-
    length chunking across DP, per-document context parallelism: each document sharded evenly over
    the CP ranks, the KV all-gathered). Modeled: Llama-3-8B, 512K-token rows of the long-tailed
    'prolong' document mix (bench.cad_sim; synthetic, not the paper's data), cp 16 x dp 32 = 512
    GPUs, activation checkpointing, FSDP. DistCA = CAD with ping-pong. WLB-LLM = all-gather KV
    (gather=all: every rank holds a piece of every document; regather=false: the gathered KV kept
    for backward, which reduce-scatters dK/dV -- per-sequence CP as WLB-LLM implements it) at
    compute balance 1 (per-document sharding gives each rank the same pairs of every document):
    the all-gather step with its core time divided by the zigzag placement's balance. Every row
    carries the same mix, so the DP stragglers that DistCA removes and variable-length chunking
    reduces do not arise here."""
    from bench.cad_sim import doc_lengths

    cl = _cluster(conf, "h200")
    cfg = ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336)
    n = 512 * 1024
    docs = tuple(doc_lengths("prolong", n, seed=0))
    run = dict(cp=16, dp=32, doc_lens=docs, activation_checkpointing=True, loss_chunk=4096, fsdp=True)
    kv_all = {"softmax": {"gather": "all", "regather": False}}  # the gathered KV kept for backward, as TE's CP
    ag = step_cost(cl, RunSpec(cfg, n, strategies={"softmax": "allgather"}, options=kv_all, **run))
    wlb = ag.step_s - sum(c.core_s - c.core_s / c.balance for c in ag.layers)
    cad = step_cost(
        cl, RunSpec(cfg, n, strategies={"softmax": "cad"}, options={"softmax": {"ping_pong": True}}, **run)
    ).step_s
    setting = "h200 profile, Llama-3-8B, 512K tokens of the prolong mix, cp 16 x dp 32"
    src = "DistCA, arXiv 2510.18121 (abstract: 'up to 1.35x'; baselines per its introduction)"
    return [
        Case(
            "DistCA: CAD over per-document CP (WLB-LLM), end-to-end",
            1.35,
            wlb / cad,
            "x",
            setting,
            src,
            False,
            "the paper's data and per-step batch composition are not reproduced (a synthetic long-tailed "
            "mix in every row), so its DP / pipeline stragglers are absent from both sides",
            assumed="the document mix (synthetic 'prolong') and cp 16 x dp 32",
        ),
        Case(
            "DistCA: CAD over all-gather KV in the zigzag placement, end-to-end",
            1.35,
            ag.step_s / cad,
            "x",
            setting,
            src,
            False,
            "not the paper's baseline: all-gather KV in the zigzag placement without per-document "
            f"balancing (compute balance {ag.layers[0].balance:.2f} on this mix) is weaker than WLB-LLM; "
            "shown for what per-document balancing is worth",
            assumed="the document mix (synthetic 'prolong') and cp 16 x dp 32",
            band=(1.3, 1.8),
        ),
    ]


def s2(conf: str) -> list[Case]:
    """S2-Attention (Lin et al. 2024, arXiv 2407.17678, abstract): wall-clock attention speed-ups of
    8.79x, 15.87x and 25.3x over FlashAttention-2 at 128K context; the abstract does not give the
    configuration of each. Modeled at 128K tokens, Llama-3-8B attention shape, block 64, 8 local
    blocks (512 tokens, the DKernel benchmark default) and vertical strides 8, 16, 32 -- an
    assumption: these strides' pattern densities fit the three figures in order -- at the same
    kernel efficiency as dense (the S2 kernel's claim): the speed-up is the FLOP ratio."""
    cl = _cluster(conf, "a100")
    n = 128 * 1024
    base = dict(vocab_size=32, dim=4096, n_layers=1, n_heads=32, n_kv_heads=8, head_dim=128)
    dense = _attention_s(cl, RunSpec(ModelConfig(**base), n))
    out = []
    for stride, published in ((8, 8.79), (16, 15.87), (32, 25.3)):
        with warnings.catch_warnings():  # 8 KV heads do not cover the stride: the local blocks do the rest
            warnings.simplefilter("ignore", UserWarning)
            sparse = ModelConfig(**base, mixer_pattern=["s2"], s2_block=64, s2_stride=stride, s2_local=8)
            ratio = dense / _attention_s(cl, RunSpec(sparse, n))
        out.append(
            Case(
                f"S2-Attention over FlashAttention-2 (attention only), stride {stride}",
                published,
                ratio,
                "x",
                f"a100 profile, 128K tokens, block 64, local 512 tokens, stride {stride}",
                "S2-Attention, arXiv 2407.17678 (abstract)",
                False,
                "the prediction is the pattern's FLOP ratio at equal kernel efficiency; a published speed-up "
                "above it means the S2 kernel ran more efficiently than the dense FlashAttention-2 call (or "
                "the assumed setting is not the paper's for this figure)",
                assumed="stride and local window (the abstract gives neither)",
                band={8: (0.8, 1.0), 16: (0.85, 1.1), 32: (0.9, 1.1)}[stride],
            )
        )
    return out


def all_cases(conf: str) -> list[Case]:
    return ring_flash_attn(conf) + lasp2(conf) + distca(conf) + s2(conf)


def table(cases: list[Case]) -> str:
    """A markdown table: published, predicted, ratio, status."""
    lines = [
        "| figure | published | predicted | predicted / published | tested band | status |",
        "|---|---|---|---|---|---|",
    ]
    for c in cases:
        if c.reproduced and c.assumed:
            status = f"within 10% under an assumed setting ({c.assumed}), not confirmed by the source"
        elif c.reproduced:
            status = "reproduced (within 10%)"
        else:
            status = f"not reproduced: {c.why}" + (f" (assumed: {c.assumed})" if c.assumed else "")
        band = "{:.3g}-{:.3g}".format(*c.tolerance)
        lines.append(
            f"| {c.name} | {c.published:.3g}{c.unit} | {c.predicted:.3g}{c.unit} | {c.ratio:.2f} | {band} | {status} |"
        )
    return "\n".join(lines)


def main(argv=None):
    """Print the table (the same as ``python -m bench.plan --reproduce``)."""
    from trainer.config import conf_dir

    print(table(all_cases(conf_dir())))


if __name__ == "__main__":
    main()
