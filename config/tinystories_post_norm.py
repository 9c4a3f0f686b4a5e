# Ablation: post-norm blocks, x = Norm(x + Attn(x)), as in the original Transformer.
include("tinystories.py")
out_dir = "out/ts_post_norm"
norm = "post"
