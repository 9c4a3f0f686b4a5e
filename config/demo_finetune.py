# Fine-tuning: the demo model (python train.py config/demo.py, trained on 40 plays) continues on the first 80% of
# The Tempest, one of the two plays it never saw, and is validated on the last 20%. Step 0's validation is the demo
# model itself, so log.csv holds the before and after. Weights only: a fresh AdamW, schedule and step counter.
include("demo.py")
out_dir = "out/demo_finetune"
init_from = "out/demo/ckpt.pt"
train_data = "data/tempest_train.txt.gz"  # 76 KB
val_data = "data/tempest_val.txt.gz"  # 20 KB, every window of it
tokenizer_dir = "data/shakespeare_tok"  # the demo's tokenizer: the weights need its ids

lr = 3e-4  # a tenth of the demo's peak: small steps from a trained model
warmup_iters = 10
max_iters = 60
batch_size = 16
eval_interval = 10
eval_tokens = 0
