"""BloomStudy: the paper's ablation study as one resource. Arms (a base BloomRun spec with
one patch each) trained to the same tokens under one GPU-hour budget and compared by loss and
zero-shot accuracy. spec.py is the resource (pure, torch-free: the operator imports it),
local.py runs a study on this machine through `bloomctl run` and `bloomctl eval`, report.py
writes its tables and plots."""
