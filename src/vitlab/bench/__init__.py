"""The speed benchmark: a vitlab model in Lightning's fit, in a bare PyTorch loop, and against timm.

`race` runs it (`bench(cfg)`), `loops` holds what the contenders run, `machine` the
device and what it is, `report` the ratios and tables, `timm_models` timm's model for
a vitlab config.
"""
