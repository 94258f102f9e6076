"""``gsae-autointerp``: explain and score sampled latents of a run with an explainer and a
scorer LLM behind any OpenAI-compatible chat endpoint (Paulo et al.'s pipeline, as the paper)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from .common import add_collect_args, collect_config, run_data, stops


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
    from ..autointerp import AnswerCache, AutoInterpConfig, EndpointError
    from ..autointerp.client import clients
    from ..autointerp.score import collection_for, run_autointerp, write_results
    from ..eval.report import add_autointerp, check_report_run, pm
    from ..hf.models import load_tokenizer
    from ..outdir import check_settings, claim, locked, owner
    from ..progress import StageBars, progress_bar
    from ..run import load_run
    from ..units import parse_count

    out = Path(args.out)
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
        tokens, settings = parse_count(args.tokens), collect_config(args)
        cache = AnswerCache(out / "cache.jsonl")
        explainer, scorer = clients(
            args.endpoint,
            args.explainer_model,
            scorer_endpoint=args.scorer_endpoint,
            scorer_model=args.scorer_model,
            api_key=os.environ.get(args.api_key_env) or None,
            concurrency=args.concurrency,
            rate=args.rate,
            retries=args.retries,
            timeout=args.timeout,
            cache=cache,
        )
        with progress_bar(tokens, "collect") as bar:
            col, how = collection_for(
                Path(args.run),
                out,
                collection=args.collection,
                settings=collected,
                tokens=tokens,
                data=run_data(args),
                config=settings,
                progress=bar.update,
            )
        print(how)
        tokenizer = load_tokenizer(col.meta["model"])
    except stops() as err:
        held.close()
        return _interrupted(out) if isinstance(err, KeyboardInterrupt) else failed(err)
    print(f"{len(cache)} answers cached in {out / 'cache.jsonl'}")
    start, bars = time.perf_counter(), StageBars()
    try:
        result = run_autointerp(col, tokenizer, explainer, scorer, cfg, bars)
        written = write_results(result, out)
        if args.report:
            with locked(args.report, "gsae-autointerp --report"):
                written += add_autointerp(args.report, result.summary)
    except KeyboardInterrupt:
        return _interrupted(out)
    except ValueError as err:  # --report: another process writes that folder now
        return failed(f"{err} (the scores are in {out})")
    except EndpointError as err:
        print(
            f"gsae-autointerp: error: {err}\n(answers so far are cached in "
            f"{out / 'cache.jsonl'}: run the same command again to resume)",
            file=sys.stderr,
        )
        return 1
    finally:
        bars.close()
        held.close()  # the lock on --out
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
        f"{explainer.sent + scorer.sent} requests sent, {time.perf_counter() - start:.1f} s; "
        f"wrote {', '.join(str(p) for p in written)}"
    )
    return 0


def failed(err) -> int:
    print(f"gsae-autointerp: error: {err}", file=sys.stderr)
    return 2


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
