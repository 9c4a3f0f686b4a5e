# TinyStories, the CS336 assignment 1 standard model: 22.7M parameters, 327,680,000 training tokens
# (batch 128 x context 256 x 10,000 steps). One H100 in bf16 reaches the 1.45 target well within the run.
# Data: data/TinyStoriesV2-GPT4-{train,valid}.txt (README: download). The first run trains the 10k tokenizer
# and tokenizes once into data/ts10k/; later runs start at once.
out_dir = "out/tinystories"
train_data = "data/TinyStoriesV2-GPT4-train.txt"
val_data = "data/TinyStoriesV2-GPT4-valid.txt"
tokenizer_dir = "data/ts10k"
vocab_size = 10000

context_length = 256
d_model = 512
num_layers = 4
num_heads = 16
d_ff = 1344  # about 8/3 d_model, a multiple of 64
rope_theta = 10000.0

lr = 2e-3  # decays to lr / 10 (min_lr_ratio) at max_iters
betas = (0.9, 0.95)
weight_decay = 0.1
grad_clip = 1.0
batch_size = 128
max_iters = 10000
warmup_iters = 150  # 1.5% of the run

eval_interval = 500
eval_tokens = 2**21  # 8,192 windows of 256 tokens spread over the validation file
log_interval = 20
target_val_loss = 1.45
