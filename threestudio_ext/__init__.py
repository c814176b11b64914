"""threestudio extension for dd3d: a prompt processor that samples a learned prompt distribution.

Importing `threestudio_ext.prompt_processor` (threestudio must be importable) registers
"dd3d-distribution-prompt-processor"; see that module for the config keys.
"""
