"""`cohost status`: both engines, the worker and GPU memory against the plan, at a glance.

checks   one `Check` per part, from what it already publishes (/health, /metrics, NVML)
report   all checks as a table or JSON, once or until Ctrl-C; exit code 1 if any is bad
"""
