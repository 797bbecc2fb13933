"""Benchmarks: tp_plugin against DeepSpeed AutoTP, transformers' own TP and the unsplit model, in one run.

    python -m bench            # or `make bench`: every section, markdown table printed, JSON + .md written
    python -m bench --quick    # toy sizes, seconds (what tests/test_bench_smoke.py exercises)

Sections (one module each): `step` (training-step time, peak RSS and collectives per rank on 2 CPU ranks),
`memmodel` (per-rank memory of 8B/70B shapes at tp=1..8 on the meta device with a fake process group),
`gpu` (per-rank compute on one CUDA device, skipped without one), `report` (tables, JSON, machine facts).
Speed and memory are measured here and never asserted in tests.
"""
