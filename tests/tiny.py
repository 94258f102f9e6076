"""A tiny randomly initialised GPTNeoX with a tokenizer trained on a small local text, built
offline for the tests (nothing is downloaded)."""

from pathlib import Path

TEXT = """The quick brown fox jumps over the lazy dog. A stitch in time saves nine.
Sparse autoencoders split dense activations into many directions, few of them active at once.

Layers that sit next to each other in a transformer tend to carry similar representations.
Grouping them lets one autoencoder serve several layers and saves compute.

Every document is joined to the next by an end-of-text token, and the stream is cut into
fixed-length chunks without a beginning-of-sequence token.
"""


def write_corpus(path: Path, copies: int = 20) -> Path:
    blocks = [TEXT.replace("fox", f"fox{i}") for i in range(copies)]
    path.write_text("\n".join(blocks))
    return path


def build_tiny_model(directory: Path, layers: int = 4, d: int = 32, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<unk>"])
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   unk_token="<unk>")  # fmt: skip
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=len(fast), hidden_size=d, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=4 * d, max_position_embeddings=256, eos_token_id=0, bos_token_id=0,
    )  # fmt: skip
    GPTNeoXForCausalLM(config).save_pretrained(directory)
    return directory
