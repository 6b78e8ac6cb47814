"""Test tiers. Markers (registered in pyproject.toml) are set per module or per test:

    gloo   spawns multi-process gloo groups (CP strategies, hybrid models, trainer)
    e2e    runs the trainer end to end
    gpu    needs CUDA (and flash-attn / fla); skipped cleanly without them
    slow   builds a wheel or runs longer than a few seconds on its own

    pytest                                        # everything (the CI command)
    pytest -m "not gloo and not e2e and not slow" # fast tier: ops vs references, configs,
                                                  # data, Hugging Face numerics (under a minute)
    pytest -m "gloo and not e2e"                  # every CP strategy on real gloo ranks

Shared spawn-and-compare helpers for strategy tests live in tests/cp_check.py; the spawn
harness itself is parallel.spawn.run_distributed (the benchmarks use it too).
"""
