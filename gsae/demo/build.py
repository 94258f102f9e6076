"""Rebuild the offline demo: a byte-level BPE tokenizer and a small GPTNeoX (Pythia's
architecture) trained on the bundled corpus, saved to ``model/`` beside this file.

    python -m gsae.demo.build [--steps 600]

The corpus, ``corpus.txt.gz``, is the Jargon File 4.4.7 (Eric S. Raymond et al.), which is in
the public domain ("to be freely used, shared, and modified"); taken from Debian's jargon-text
package. Documents are its paragraphs (blank-line separated). Takes ~8 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus.txt.gz"
MODEL = HERE / "model"


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=special, bos_token=special, pad_token=special
    )


def main(argv=None) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from gsae.hf.texts import iter_texts

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--out", default=str(MODEL))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    texts = list(iter_texts(str(CORPUS)))
    tokenizer = train_tokenizer(texts, args.vocab)
    ids = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    data = torch.tensor(ids)
    print(f"{len(texts)} documents, {len(data):,} tokens")
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.d,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        intermediate_size=4 * args.d,
        max_position_embeddings=1024,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPTNeoXForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = 100
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    start = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.ctx - 1, (args.batch,))
        batch = torch.stack([data[s : s + args.ctx] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)")
    out = Path(args.out)
    model.half().save_pretrained(out)  # fp16 on disk keeps the demo small; loads in any dtype
    tokenizer.save_pretrained(out)
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
