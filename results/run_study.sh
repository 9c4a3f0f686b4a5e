#!/usr/bin/env bash
# The README results study on the committed Shakespeare corpus, about 40 minutes on a 2-core CPU:
#   (a) learning-rate sweep, (b) batch-size sweep at equal tokens, (c) the four ablations (+ second seeds).
# Every run is `python train.py config/shakespeare.py --out_dir=out/study/NAME --key=value ...`, JOBS at a time
# with OMP_NUM_THREADS threads each (two 1-thread runs beat one 2-thread run on 2 cores). Afterwards each run's
# log.csv and config.json are copied to results/GROUP/NAME/ and the figures are drawn into assets/ with plot.py.
#
#   bash results/run_study.sh                 # everything
#   JOBS=1 OMP_NUM_THREADS=2 bash results/run_study.sh   # one run at a time instead
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=out/study
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
LR=1e-2  # the baseline's learning rate (config/shakespeare.py)
BATCH=32 ITERS=250 WARMUP=20 EVAL_INTERVAL=50 LOG_INTERVAL=10  # the baseline's, as in the config
mkdir -p "$OUT/logs"

calc() { python -c "v = $1; print(round(v) if v >= 1 else f'{v:.3g}')"; }  # calc '3e-3 / 10' -> 0.0003

run() {  # run NAME --key=value ...: start one training run in the background once fewer than JOBS are running
    local name=$1; shift
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
    echo "$(date +%T) start $name $*"
    python train.py config/shakespeare.py --out_dir="$OUT/$name" "$@" > "$OUT/logs/$name.txt" 2>&1 &
}

lr_run() {  # lr_run NAME LR [--key=value ...]: a run at this peak lr, decaying to lr/10 (min_lr follows lr)
    local name=$1 lr=$2; shift 2
    run "$name" --lr="$lr" "$@"
}

start=$(date +%s)
# Longest runs first, so the last ones to finish are short. The baseline is lr_$LR (seed 1337, as in the config).
# (b) batch size at equal tokens (batch x steps = 32 x 250 sequences): steps, warm-up, logging and evaluation
# scale with 32/batch, so every run sees the same tokens and is validated at the same token counts (on the same
# fixed windows: eval_tokens does not depend on the batch size); lr scaled by sqrt(batch / 32) from the baseline's.
for b in 8 16 64; do
    k=$(calc "$BATCH / $b")
    lr_run "bs_$b" "$(calc "$LR * ($b / $BATCH) ** 0.5")" --batch_size=$b \
        --max_iters="$(calc "$ITERS * $k")" --warmup_iters="$(calc "$WARMUP * $k")" \
        --eval_interval="$(calc "$EVAL_INTERVAL * $k")" --log_interval="$(calc "$LOG_INTERVAL * $k")"
done
# (a) learning rate, from 1e-4 up to a value that blows up (stopped early and marked 'diverged' in log.csv)
for lr in 1e-4 1e-3 3e-3 $LR 3e-2; do lr_run "lr_$lr" "$lr"; done
# (c) ablations at the baseline's token budget; second seeds where the differences are small
lr_run base_seed2 $LR --seed=2
lr_run post_norm $LR --norm=post
lr_run post_norm_seed2 $LR --norm=post --seed=2
lr_run silu $LR --ffn=silu --d_ff=576  # 2 x 128 x 576 = 3 x 128 x 384: the same parameters as SwiGLU
lr_run silu_seed2 $LR --ffn=silu --d_ff=576 --seed=2
lr_run nope $LR --pos=none
lr_run no_norm_lr2e-3 2e-3 --norm=none
lr_run "no_norm_lr$LR" $LR --norm=none
# Follow-ups to what the runs above showed: post-norm stalls at lr=$LR (lower lr?), no norm does not diverge at
# lr=$LR (second seed, and a higher lr), and the baseline's two seeds differ by 0.09 (a third seed; NoPE's second).
lr_run post_norm_lr3e-3 3e-3 --norm=post
lr_run "no_norm_lr${LR}_seed2" $LR --norm=none --seed=2
lr_run nope_seed2 $LR --pos=none --seed=2
lr_run base_seed3 $LR --seed=3
lr_run no_norm_lr3e-2 3e-2 --norm=none
lr_run lr_1 1.0
wait
echo "$(date +%T) all runs done in $(( ($(date +%s) - start) / 60 )) min"

# Copy the small files that plot.py needs into results/GROUP/NAME/.
keep() {  # keep GROUP NAME...
    local group=$1; shift
    for name in "$@"; do
        mkdir -p "results/$group/$name"
        cp "$OUT/$name/log.csv" "$OUT/$name/config.json" "results/$group/$name/"
    done
}
keep baseline "lr_$LR"
keep lr lr_1e-4 lr_1e-3 lr_3e-3 lr_3e-2 lr_1
keep batch bs_8 bs_16 bs_64
keep ablations base_seed2 base_seed3 post_norm post_norm_seed2 post_norm_lr3e-3 silu silu_seed2 nope nope_seed2 \
    no_norm_lr2e-3 "no_norm_lr$LR" "no_norm_lr${LR}_seed2" no_norm_lr3e-2

# Figures and tables, from the committed files alone.
mkdir -p assets
L=results/lr
python plot.py $L/lr_1e-4 $L/lr_1e-3 $L/lr_3e-3 results/baseline/* $L/lr_3e-2 $L/lr_1 --label=lr --out=assets/lr_sweep.png \
    --table=md
python plot.py results/batch/bs_8 results/batch/bs_16 results/baseline/* results/batch/bs_64 \
    --label=batch_size,lr --out=assets/batch_sweep.png --table=md
A=results/ablations  # one seed each; then the runs with two or three seeds, on a finer scale
python plot.py results/baseline/* $A/no_norm_lr1e-2 $A/no_norm_lr2e-3 $A/no_norm_lr3e-2 $A/post_norm \
    $A/post_norm_lr3e-3 $A/nope $A/silu --label=norm,pos,ffn,lr --out=assets/ablations.png --ylim 3.9 6.4 --table=md
python plot.py results/baseline/* $A/base_seed2 $A/base_seed3 $A/no_norm_lr1e-2 $A/no_norm_lr1e-2_seed2 $A/nope \
    $A/nope_seed2 $A/silu $A/silu_seed2 --label=norm,pos,ffn,seed --out=assets/ablation_seeds.png --ylim 4.0 5.2 --table=md
echo "$(date +%T) done in $(( ($(date +%s) - start) / 60 )) min"
