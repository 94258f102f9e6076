"""Command-line entry points: ``gsae-groups`` (and ``gsae-train``, see trainer.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from . import grouping as gp
from .grouping import model_costs  # the FLOP model lives in the library (gsae-eval uses it)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def add_data_args(p: argparse.ArgumentParser) -> None:
    from .activations import DEFAULT_DATASET

    p.add_argument(
        "--model",
        default="pythia-160m",
        help="local directory, hub id, pythia-<size> or 'demo' (default: %(default)s)",
    )
    p.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help="hub dataset id (streamed), local .txt/.jsonl/.parquet[.gz], saved "
        "datasets dir, or 'demo' (default: %(default)s)",
    )
    p.add_argument("--split", default="train")
    p.add_argument("--column", default="text", help="text column of the dataset")
    p.add_argument("--ctx-len", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument(
        "--repeat",
        action="store_true",
        help="cycle over a finite dataset instead of stopping at its end",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--model-dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="dtype of the model forward (default: %(default)s)")  # fmt: skip


def groups_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gsae-groups",
        description="Group the layers of a model by the mean angular distance of their residual "
        "streams (complete linkage), print AMAD and the compute saving for every G, and write "
        "groups.json with a heatmap and an AMAD plot.",
    )
    add_data_args(p)
    p.add_argument("--tokens", default="10M", help="tokens to average over (default: %(default)s)")
    p.add_argument("--out", default=None, help="output directory (default: groups-<model>)")
    p.add_argument(
        "--threshold",
        type=float,
        default=gp.DEFAULT_THRESHOLD,
        help="G_hat = smallest G with AMAD(G) below this (default: %(default)s)",
    )
    p.add_argument(
        "--include-last",
        action="store_true",
        help="group the last layer too (by default it gets its own SAE)",
    )
    p.add_argument(
        "--center",
        action="store_true",
        help="subtract each layer's running mean first (the authors' code)",
    )
    p.add_argument(
        "--cluster-space",
        choices=["precomputed", "rows"],
        default="precomputed",
        help="'rows': Euclidean linkage on the matrix rows, as the authors' code",
    )
    p.add_argument("--expansion-factor", type=int, default=16, help="for the SAE cost estimate")
    p.add_argument("--k", type=int, default=128, help="for the SAE cost estimate")
    p.add_argument(
        "--from-matrix",
        default=None,
        metavar="FILE",
        help="an L x L .npy or JSON matrix: group exactly its rows, no model needed",
    )
    return p  # fmt: skip


def load_matrix(path: str) -> np.ndarray:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no matrix file at {p}")
    if p.suffix == ".npy":
        return gp.check_distance_matrix(np.load(p))
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: expected a .npy file or a JSON list of lists ({err})") from None
    if isinstance(data, dict) and "distances" in data:  # a groups.json works too
        data = data["distances"]
    return gp.check_distance_matrix(data)


def stream_hidden(loaded, layers, args, tokens: int, position=None):
    """(hidden-state batches [L, N, d], TokenStream) over the dataset of ``args``."""
    from .activations import ActivationReader, TokenStream, iter_texts

    iter_texts(args.dataset, args.split, args.column)  # fail now, before any thread starts
    reader = ActivationReader(loaded, layers)
    stream = TokenStream(
        lambda: iter_texts(args.dataset, args.split, args.column),
        loaded.tokenizer, ctx_len=args.ctx_len, batch_size=args.batch_size,
        position=position, repeat=args.repeat,
    )  # fmt: skip
    return (reader(b.input_ids, b.attention_mask) for b in stream), stream


def progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True)


def measure_model(args) -> gp.Grouping:
    from .activations import load_model

    tokens = gp.parse_count(args.tokens)
    args.model = args.model or "pythia-160m"
    loaded = load_model(args.model, args.model_dtype, _device(args.device))
    n = loaded.num_layers
    layers = list(range(n if args.include_last or n == 1 else n - 1))
    batches, stream = stream_hidden(loaded, layers, args, tokens)
    start = time.perf_counter()
    with stream, progress_bar(tokens, "distances") as bar:
        acc = gp.measure_distances(batches, len(layers), tokens, args.center, bar.update)
    if acc.count < tokens:
        warnings.warn(f"the dataset ran out after {acc.count} of {tokens} tokens "
                      "(--repeat cycles over it)", RuntimeWarning, stacklevel=2)  # fmt: skip
    costs = model_costs(loaded, layers, args.ctx_len, args.expansion_factor, args.k, "sparse")
    paper = model_costs(loaded, layers, args.ctx_len, args.expansion_factor, args.k, "dense")
    result = gp.group_layers(
        acc.matrix(), layers, model=args.model, tokens=acc.count, threshold=args.threshold,
        cluster_space=args.cluster_space, costs=costs,
        extra={"num_model_layers": n, "center": args.center,
               "seconds": round(time.perf_counter() - start, 2)},
    )  # fmt: skip
    result.extra["savings_dense_sae"] = {
        str(g): gp.compute_savings(g, len(layers), *paper) for g in result.partitions
    }
    return result


def format_table(g: gp.Grouping) -> str:
    dense = g.extra.get("savings_dense_sae", {})
    rows = [f"{'G':>4}  {'groups (label per layer)':<{max(24, 3 * len(g.layers))}}  {'AMAD':>6}"
            f"  {'Δ% gsae':>8}  {'Δ% dense':>8}"]  # fmt: skip
    for num, part in sorted(g.partitions.items()):
        mark = "*" if num == g.g_hat else " "
        labels = " ".join(f"{x:>2}" for x in part.labels)
        saving = f"{100 * g.savings[num]:8.1f}" if num in g.savings else f"{'-':>8}"
        paper = f"{100 * dense[str(num)]:8.1f}" if str(num) in dense else f"{'-':>8}"
        rows.append(f"{num:>3}{mark}  {labels:<{max(24, 3 * len(g.layers))}}  {part.amad:6.3f}"
                    f"  {saving}  {paper}")  # fmt: skip
    rows.append(f"* G_hat = {g.g_hat}: the smallest G with AMAD < {g.threshold}; layers "
                f"{g.layers}; {g.tokens:,} tokens")  # fmt: skip
    if g.savings:
        note = ("Δ%: compute saved against one SAE per layer (Eq. 5), with gsae's sparse kernels "
                "and with a dense SAE step (the paper's Table 2 convention)")  # fmt: skip
        rows.append(note)
    return "\n".join(rows)


def write_outputs(g: gp.Grouping, out: Path) -> None:
    from . import plots

    out.mkdir(parents=True, exist_ok=True)
    g.save(out / "groups.json")
    name = Path(g.model).name if g.model else "distance matrix"
    title = f"{name} ({g.tokens:,} tokens)" if g.tokens else name
    plots.distance_heatmap(g.distances, g.layers, out / "distances.png", title)
    amads = {num: p.amad for num, p in g.partitions.items()}
    plots.amad_curve(amads, g.g_hat, g.threshold, out / "amad.png", title)


def groups_main(argv=None) -> int:
    args = groups_parser().parse_args(argv)
    from .activations import DatasetLoadError, ModelLoadError

    try:
        if args.from_matrix:
            matrix = load_matrix(args.from_matrix)
            result = gp.group_layers(
                matrix, model=args.model or "",
                threshold=args.threshold, cluster_space=args.cluster_space,
                extra={"source": str(args.from_matrix)},
            )  # fmt: skip
        else:
            result = measure_model(args)
    except (ModelLoadError, DatasetLoadError, ValueError, FileNotFoundError) as err:
        print(f"gsae-groups: error: {err}", file=sys.stderr)
        return 2
    name = Path(str(result.model or "matrix")).name
    out = Path(args.out or f"groups-{name}")
    write_outputs(result, out)
    print(format_table(result))
    print(f"wrote {out / 'groups.json'}, {out / 'distances.png'}, {out / 'amad.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(groups_main())
