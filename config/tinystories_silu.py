# Ablation: ungated SiLU FFN, w2(silu(w1 x)), with d_ff = 4 d_model: its two matrices hold about what SwiGLU's three
# do (2 x 2048 vs 3 x 1344 per d_model row, 1.6% more; d_ff=2016 would match exactly).
include("tinystories.py")
out_dir = "out/ts_silu"
ffn = "silu"
d_ff = 2048
