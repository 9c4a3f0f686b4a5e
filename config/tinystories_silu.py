# Ablation: ungated SiLU FFN, w2(silu(w1 x)), with d_ff = 4 d_model so its two matrices match SwiGLU's three.
include("tinystories.py")
out_dir = "out/ts_silu"
ffn = "silu"
d_ff = 2048
