# Demo: CPU, no download. Trains a 2,048-token BPE tokenizer and a 1.4M-parameter model on the committed Shakespeare
# corpus in about two minutes on 2 idle cores (1M training tokens); then `python sample.py --out_dir=out/demo`.
out_dir = "out/demo"
train_data = "data/shakespeare_train.txt.gz"  # 40 plays, 4.8 MB, about 1.8M tokens
val_data = "data/shakespeare_val.txt.gz"  # The Tempest and Twelfth Night, held out
tokenizer_dir = "data/shakespeare_tok"
vocab_size = 2048

context_length = 128
d_model = 128
num_layers = 4
num_heads = 4
d_ff = 384  # 8/3 d_model rounded up to a multiple of 64 (d_ff=None would give the nearest multiple, 320)

lr = 3e-3  # decays to lr / 10 (min_lr_ratio)
warmup_iters = 20
batch_size = 32
max_iters = 250  # the cosine decay ends here (cosine_iters=None)
eval_interval = 50
eval_tokens = 2**15  # 256 windows of 128 tokens, spread over the two held-out plays
log_interval = 10
device = "cpu"
