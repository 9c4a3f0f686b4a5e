# Study baseline (README "Results"): the demo model on the committed Shakespeare corpus, trained longer.
# 1.4M parameters, 2,048-token BPE; see results/run_study.sh for the sweeps and ablations built on it.
include("demo.py")
out_dir = "out/shakespeare"
