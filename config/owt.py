# OpenWebText sample with a 32k tokenizer: the CS336 experiment that trains the TinyStories architecture for the
# same number of steps on web text. Tokenize once first (11 GB of text: all cores, bounded memory), then train:
#   python data.py config/owt.py
#   torchrun --standalone --nproc_per_node=8 train.py config/owt.py     (or: python train.py config/owt.py)
include("tinystories.py")
out_dir = "out/owt"
train_data = "data/owt_train.txt"
val_data = "data/owt_valid.txt"
tokenizer_dir = "data/owt32k"
vocab_size = 32000
target_val_loss = None
