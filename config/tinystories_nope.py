# Ablation: no position embedding at all (NoPE); causal attention alone must infer positions.
include("tinystories.py")
out_dir = "out/ts_nope"
pos = "none"
