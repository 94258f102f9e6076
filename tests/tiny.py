"""A tiny randomly initialised GPTNeoX with a tokenizer trained on a small local text, built
offline for the tests (nothing is downloaded), tiny models of the other families, and the flags
of the tests' small runs."""

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


def build_tiny_model(
    directory: Path, layers: int = 4, d: int = 32, seed: int = 0, positions: int = 256
) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<unk>"])
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=len(fast),
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * d,
        max_position_embeddings=positions,
        eos_token_id=0,
        bos_token_id=0,
    )
    GPTNeoXForCausalLM(config).save_pretrained(directory)
    return directory


def build_family(
    kind: str, directory: Path, tokenizer_dir: Path, positions: int = 64, layers: int = 3
) -> Path:
    """A tiny random model of another family (gpt2, llama, bert, gptneox) with ``positions``
    positions, sharing the tokenizer saved in ``tokenizer_dir``."""
    import shutil

    import torch
    import transformers as tf

    torch.manual_seed(0)
    d, heads = 32, 4
    shape = dict(  # llama, bert and gptneox name their sizes alike
        vocab_size=300,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * d,
        max_position_embeddings=positions,
    )
    configs = {
        "gpt2": (
            tf.GPT2Config(
                vocab_size=300, n_embd=d, n_layer=layers, n_head=heads, n_positions=positions
            ),
            tf.GPT2LMHeadModel,
        ),
        "llama": (tf.LlamaConfig(**shape), tf.LlamaForCausalLM),
        "bert": (tf.BertConfig(**shape), tf.BertModel),
        "gptneox": (tf.GPTNeoXConfig(**shape), tf.GPTNeoXForCausalLM),
    }
    config, cls = configs[kind]
    cls(config).save_pretrained(directory)
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, directory / f.name)
    return directory


def small_config(**kw):
    """A small SAE's config (d 32, 128 latents, k 4) for the tests of the SAE, its step and its
    files; ``kw`` overrides any field."""
    from gsae.sae import SaeConfig

    base = dict(d=32, num_latents=128, k=4, dead_threshold=20_000)
    return SaeConfig(**{**base, **kw})


def flags(**named) -> list[str]:
    """Command-line flags from keywords, in their order: ``batch_tokens="512"`` is
    ``["--batch-tokens", "512"]``, ``repeat=True`` is ``["--repeat"]``; values go through str()."""
    argv = []
    for name, value in named.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


# the budget of conftest's trained_runs, which gsae-eval's tests train more runs on
RUN_BUDGET = dict(
    batch_tokens="512",
    ctx_len="64",
    k="8",
    scale_tokens="1k",
    grouping_tokens="2k",
    dead_threshold="3k",
    expansion_factor="4",
    log_every="100",
    device="cpu",
)


def local_run(model, corpus, out, **budget) -> list[str]:
    """gsae-train's or gsae-groups' flags for a run of a local model over a local text, repeated
    (a tiny corpus runs out), on the CPU; ``budget``: more flags, as for :func:`flags`."""
    return flags(model=model, dataset=corpus, out=out, **budget, repeat=True, device="cpu")


# gsae-eval at its smallest, on conftest's trained runs: 256 tokens, no spliced forwards
QUICK_EVAL = flags(
    tokens=256, batch_tokens=256, no_downstream=True, mmco_pairs="none", device="cpu"
)

# the collection of gsae-browse's and gsae-autointerp's tests (each adds its own --random)
SMALL_COLLECTION = flags(tokens=1536, batch_tokens=512, device="cpu", window=16, top=6)


def train_flags(tokens: str) -> list[str]:
    """gsae-train flags for a run of a few steps on a tiny model: 2 groups, scales from 256
    tokens, batches of 128 tokens in contexts of 32, k 8 of 4x latents."""
    return [
        "--tokens",
        tokens,
        "--scale-tokens",
        "256",
        "--batch-tokens",
        "128",
        "--ctx-len",
        "32",
        "--k",
        "8",
        "--expansion-factor",
        "4",
        "--dead-threshold",
        "300",
        "--groups",
        "even:2",
        "--log-every",
        "2",
    ]


def short_run(tokens: str, grouping_tokens: str, scale_tokens: str, **more) -> list[str]:
    """gsae-train flags for a short run of the tiny model: batches of 512 tokens in contexts of
    64, k 8, the corpus repeated, on the CPU; ``more``: further flags, as for :func:`flags`."""
    budget = dict(tokens=tokens, grouping_tokens=grouping_tokens, scale_tokens=scale_tokens)
    return flags(**budget, batch_tokens=512, ctx_len=64, k=8, repeat=True, device="cpu", **more)


def demo_run(out, tokens: str, **more) -> list[str]:
    """gsae-train flags for a run of the bundled demo model over the demo corpus into ``out``."""
    return flags(model="demo", dataset="demo", out=out, tokens=tokens, **more)


def config_flags(folder: Path, **settings) -> list[str]:
    """``--config FILE`` for gsae-train's research settings (those without a flag), written
    as a JSON file in ``folder``."""
    import json

    path = Path(folder) / f"config-{len(list(Path(folder).glob('config-*.json')))}.json"
    path.write_text(json.dumps(settings))
    return ["--config", str(path)]
