"""``gsae-browse``: a static latent browser for a gsae-train run."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from .common import add_run_data_args


def add_collect_args(p: argparse.ArgumentParser, tokens: str = "1M") -> None:
    """The flags of the streamed collection (shared by gsae-browse and gsae-autointerp)."""
    p.add_argument("--tokens", default=tokens, help="tokens to stream (default: %(default)s)")
    add_run_data_args(p)
    p.add_argument("--window", type=int, default=32,
                   help="tokens per example window (default: %(default)s, the "
                   "paper's)")  # fmt: skip
    p.add_argument("--top", type=int, default=20,
                   help="top-activating windows kept per latent and layer (default: "
                   "%(default)s)")  # fmt: skip
    p.add_argument("--random", type=int, default=10,
                   help="random activating windows kept per latent and layer (default: "
                   "%(default)s)")  # fmt: skip
    p.add_argument("--pool", type=int, default=128,
                   help="random windows kept per layer, for non-activating examples (default: "
                   "%(default)s)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gsae-browse",
        description="Stream text through a gsae-train run's model and SAEs and write a static, "
        "self-contained latent browser into --out (open index.html): per latent its top and "
        "random activating contexts, firing frequency and activation histogram, how it fires "
        "over the layers of its group, its nearest latents and, with --baseline, its best match "
        "among a per-layer run's latents.",
    )
    p.add_argument("run", metavar="RUN", help="a gsae-train output folder")
    p.add_argument("--out", required=True, help="output folder (replaced as a whole)")
    p.add_argument("--baseline", default=None, metavar="RUN",
                   help="a gsae-train --groups per-layer run of the same model")  # fmt: skip
    add_collect_args(p)
    p.add_argument("--neighbours", type=int, default=8,
                   help="nearest latents by decoder cosine shown (default: "
                   "%(default)s)")  # fmt: skip
    p.add_argument("--jaccard-memory", default="4G",
                   help="memory for the co-occurrence counts behind --baseline's Jaccard match "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out folder that gsae-browse did not write")  # fmt: skip
    return p


def collect_config(args):
    from ..browse.collect import CollectConfig

    cfg = CollectConfig(window=args.window, top=args.top, random=args.random, pool=args.pool,
                        neighbours=getattr(args, "neighbours", 8), seed=args.seed)  # fmt: skip
    return cfg.validate()


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from ..browse.collect import collect
    from ..browse.site import write_site
    from ..grouping import parse_count
    from ..hf.models import ModelLoadError, load_tokenizer
    from ..hf.texts import DatasetLoadError
    from ..outdir import claim, kept_words
    from ..progress import progress_bar
    from .eval import parse_bytes

    out = Path(args.out)
    existed, held = out.is_dir(), contextlib.ExitStack()
    inputs = [args.run] + ([args.baseline] if args.baseline else [])
    try:
        held.enter_context(claim(out, "gsae-browse", inputs=inputs, overwrite=args.overwrite))
        tokens = parse_count(args.tokens)
        config = collect_config(args)
        memory = parse_bytes(args.jaccard_memory)
        start = time.perf_counter()
        with progress_bar(tokens, "collect") as bar:
            col = collect(args.run, tokens=tokens, dataset=args.dataset, split=args.split,
                          column=args.column, ctx_len=args.ctx_len,
                          batch_tokens=args.batch_tokens, device=args.device,
                          model_dtype=args.model_dtype, baseline=args.baseline, config=config,
                          jaccard_memory=memory, progress=bar.update)  # fmt: skip
        seconds = time.perf_counter() - start
        write_site(col, load_tokenizer(col.meta["model"]), out)  # and the collection, at once
    except (ModelLoadError, DatasetLoadError, ValueError, FileNotFoundError) as err:
        print(f"gsae-browse: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ngsae-browse: interrupted; {kept_words(out, existed)}", file=sys.stderr)
        return 130
    finally:
        held.close()  # the lock on --out
    for note in col.meta["notes"]:
        print(f"note: {note}")
    latents = sum(v["m"] for v in col.meta["saes"].values())
    print(f"{col.meta['tokens']:,} tokens in {seconds:.1f} s; {latents:,} latents of "
          f"{len(col.saes)} SAEs; open {out / 'index.html'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
