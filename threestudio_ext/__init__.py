"""threestudio extension for dd3d: a prompt processor that samples a learned prompt distribution.

Its processor arrives with stage 2 (issue 4); this package is a placeholder so the project layout is stable.
"""
