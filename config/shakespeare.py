# Study baseline (README "Results", results/run_study.sh): the demo model and budget on the committed Shakespeare
# corpus, 1.4M parameters, 2,048-token BPE, 250 steps x 32 x 128 = 1M training tokens. Sweeps override --lr (min_lr
# follows as lr/10), --batch_size (pass --max_iters too: it is fixed here) and model flags.
include("demo.py")
out_dir = "out/shakespeare"
lr = 1e-2  # best of the study's lr sweep at this budget (demo.py: 3e-3)
diverge_factor = 1.5  # loss 1.5x its first value (about ln 2048 = 7.6) is a blow-up; at 3.0 grad clipping hides them
