"""``gsae-autointerp``: explain and score sampled latents of a run with an explainer and a
scorer LLM behind any OpenAI-compatible chat endpoint (Paulo et al.'s pipeline, as the paper)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from .common import add_collect_args, collect_config, run_data


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gsae-autointerp",
        description="Sample latents of every SAE of a gsae-train run, explain each (at each layer "
        "of its group) from its top-activating windows with an explainer LLM, score the "
        "explanations by detection and fuzzing with a scorer LLM, and write per-latent "
        "explanations and scores, per-layer and per-group means (the paper's aggregation) to "
        "--out, and with --report into a gsae-eval report. Answers are cached in --out: run the "
        "same command again to resume without re-asking.",
    )
    p.add_argument("run", metavar="RUN", help="a gsae-train output folder")
    p.add_argument(
        "--endpoint",
        required=True,
        help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1 (vLLM), "
        "http://localhost:11434/v1 (Ollama), https://api.openai.com/v1",
    )
    p.add_argument(
        "--explainer-model", default=None, help="the explainer (and scorer) model's name (required)"
    )
    # the flag's old name, kept for users' scripts: --model is the transformer in every other
    # command
    p.add_argument("--model", dest="old_model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scorer-model", default=None, help="another model for scoring")
    p.add_argument("--scorer-endpoint", default=None, help="default: --endpoint")
    p.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the API key (default: %(default)s; "
        "unset: no key is sent)",
    )
    p.add_argument("--out", required=True, help="output folder (also holds the answer cache)")
    p.add_argument(
        "--latents",
        type=int,
        default=64,
        help="latents sampled per SAE (default: %(default)s, the paper's)",
    )
    p.add_argument(
        "--explain",
        type=int,
        default=10,
        help="top windows shown to the explainer (default: %(default)s)",
    )
    p.add_argument(
        "--test",
        type=int,
        default=10,
        help="activating and as many non-activating windows per scoring prompt "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="requests in flight at once (default: %(default)s)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="at most this many requests per second (default: no limit)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=5,
        help="retries of a request on errors and HTTP 429/5xx (default: %(default)s)",
    )
    p.add_argument("--timeout", type=float, default=120, help="seconds per request")
    p.add_argument(
        "--collection",
        default=None,
        metavar="DIR",
        help="reuse the collection of a gsae-browse --out DIR of this run instead "
        "of streaming text again",
    )
    p.add_argument(
        "--report",
        default=None,
        metavar="EVAL_DIR",
        help="add the scores to this gsae-eval output folder (autointerp.jsonl, "
        "Figure 4, report.html)",
    )
    add_collect_args(p, tokens="1M")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags; the deprecated ``--model`` stands for ``--explainer-model``, with a warning."""
    p = parser()
    args = p.parse_args(argv)
    if args.old_model is not None:
        print(
            "gsae-autointerp: warning: --model is deprecated, use --explainer-model",
            file=sys.stderr,
        )
        if args.explainer_model not in (None, args.old_model):
            p.error("--model and --explainer-model name different models: give --explainer-model")
        args.explainer_model = args.old_model
    if args.explainer_model is None:
        p.error("the following arguments are required: --explainer-model")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..autointerp import AnswerCache, AutoInterpConfig, ChatClient, EndpointError
    from ..autointerp.score import load_collection, run_autointerp, write_results
    from ..browse.collect import Collection, collect
    from ..eval.report import add_autointerp, check_report_run, pm
    from ..hf.models import ModelLoadError, load_tokenizer
    from ..hf.texts import DatasetLoadError
    from ..outdir import MARKER, check_settings, claim, locked, owner, write_marker
    from ..progress import progress_bar
    from ..run import load_run
    from ..units import parse_count

    out = Path(args.out)
    key = os.environ.get(args.api_key_env) or None
    held = contextlib.ExitStack()
    try:
        run = load_run(args.run)  # names RUN when it is not a run
        inputs = [run.path] + ([args.collection] if args.collection else [])
        held.enter_context(claim(out, "gsae-autointerp", inputs=inputs, replaced=False))
        if args.report and owner(args.report) != "gsae-eval":
            raise ValueError(f"--report {args.report} holds no gsae-eval report.html")
        if args.report:
            check_report_run(args.report, str(run.path.resolve()))
        collected = collect_settings(args, run.path)
        if not args.collection and (out / "collection").exists():  # reused: as asked?
            check_settings(out, collected)
        cfg = AutoInterpConfig(args.latents, args.explain, args.test, args.seed).validate()
        cfg.check_sizes({sae.name: sae.m for sae in run.saes})
        settings = collect_config(args)
        tokens = parse_count(args.tokens)
        cache = AnswerCache(out / "cache.jsonl")
        common = {
            "api_key": key,
            "concurrency": args.concurrency,
            "rate": args.rate,
            "retries": args.retries,
            "timeout": args.timeout,
            "cache": cache,
        }
        explainer = ChatClient(args.endpoint, args.explainer_model, **common)
        scorer = ChatClient(
            args.scorer_endpoint or args.endpoint,
            args.scorer_model or args.explainer_model,
            **common,
        )
        if args.collection:
            col = load_collection(args.run, args.collection)
        elif (out / "collection" / "collection.json").exists():
            col = load_collection(args.run, out / "collection")  # a resumed run: same examples
            print(f"reusing the collection in {out / 'collection'} ({col.meta['tokens']:,} tokens)")
        else:
            with progress_bar(tokens, "collect") as bar:
                col = collect(
                    args.run,
                    tokens=tokens,
                    **run_data(args),
                    config=settings,
                    progress=bar.update,
                )
            write_marker(out, "gsae-autointerp", collected)  # first: what it is collected with
            col.save(out / "collection")
        if not (out / MARKER).exists():
            write_marker(out, "gsae-autointerp")
        tokenizer = load_tokenizer(col.meta["model"])
    except (ModelLoadError, DatasetLoadError, ValueError, FileNotFoundError) as err:
        held.close()
        print(f"gsae-autointerp: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        held.close()
        return _interrupted(out)
    assert isinstance(col, Collection)
    print(f"{len(cache)} answers cached in {out / 'cache.jsonl'}")
    start = time.perf_counter()
    bars = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            from tqdm.auto import tqdm

            bars[stage] = tqdm(total=total, desc=stage, unit="req", dynamic_ncols=True)
        bars[stage].update(done - bars[stage].n)

    try:
        result = run_autointerp(col, tokenizer, explainer, scorer, cfg, progress)
        written = write_results(result, out)
        if args.report:
            with locked(args.report, "gsae-autointerp --report"):
                written += add_autointerp(args.report, result.summary)
    except KeyboardInterrupt:
        return _interrupted(out)
    except ValueError as err:  # --report: another process writes that folder now
        print(f"gsae-autointerp: error: {err} (the scores are in {out})", file=sys.stderr)
        return 2
    except EndpointError as err:
        print(
            f"gsae-autointerp: error: {err}\n(answers so far are cached in "
            f"{out / 'cache.jsonl'}: run the same command again to resume)",
            file=sys.stderr,
        )
        return 1
    finally:
        for bar in bars.values():
            bar.close()
        held.close()  # the lock on --out
    seconds = time.perf_counter() - start
    overall = result.summary["overall"]
    print(
        f"{len(result.records)} latent x layer pairs scored ({len(result.skipped)} skipped); "
        f"detection {pm(overall['detection'])}, fuzzing {pm(overall['fuzzing'])}"
    )
    if result.summary["unreadable_answers"]:
        print(
            f"{result.summary['unreadable_answers']} answers could not be read: not cached, "
            "they are asked again when the same command runs again"
        )
    print(
        f"{explainer.sent + scorer.sent} requests sent, {seconds:.1f} s; wrote "
        f"{', '.join(str(p) for p in written)}"
    )
    return 0


def _interrupted(out: Path) -> int:
    kept = (
        f"{out} keeps the answers received so far (cache.jsonl)"
        if (out / "cache.jsonl").exists()
        else "no answer was received yet"
    )
    print(
        f"\ngsae-autointerp: interrupted; {kept}: run the same command again to resume",
        file=sys.stderr,
    )
    return 130


def collect_settings(args, run: Path) -> dict:
    """What makes the collection in --out: a rerun into it must ask for the same."""
    return {
        "run": str(run.resolve()),
        "dataset": args.dataset,
        "split": args.split,
        "column": args.column,
        "ctx_len": args.ctx_len,
        "tokens": args.tokens,
        "window": args.window,
        "top": args.top,
        "random": args.random,
        "pool": args.pool,
        "seed": args.seed,
    }


if __name__ == "__main__":
    sys.exit(main())
