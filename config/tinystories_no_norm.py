# Ablation: no RMSNorm anywhere. At the baseline lr it tends to diverge (the run stops and is marked 'diverged');
# a lower lr trains. Compare with:
#   python train.py config/tinystories_no_norm.py --lr=2e-3 --out_dir=out/ts_no_norm_2e-3
include("tinystories.py")
out_dir = "out/ts_no_norm"
norm = "none"
lr = 5e-4
