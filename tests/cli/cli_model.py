"""The tiny Llama the command-line tests run on: its seed, vocabulary and adapter rank."""

SEED, VOCAB, RANK = 5, 300, 4
