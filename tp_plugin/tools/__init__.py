"""The command line and what it runs: `tp-plugin verify`, the planner (`tp-plugin plan`) and their reports,
the tiny models they build.

May import anything in the package; nothing in the package imports it except `testing/` helpers' users and the
CLI itself (enforced by tests/test_layering.py).
"""
