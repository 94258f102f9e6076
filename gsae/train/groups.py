"""Which layers share an SAE in a run: measured (``--groups auto`` or ``N``), read from a
groups file, or a fixed layout (``per-layer``, ``even:N``); checked against the model before
any work. The last layer gets its own SAE unless it was grouped."""

from __future__ import annotations

from pathlib import Path

from .. import grouping as gp
from ..hf.hub import hub_id
from ..hf.models import LoadedModel
from ..hf.texts import TextSource
from .settings import RunSettings

SPEC_HELP = "--groups must be auto, N, per-layer or even:N"


def group_name(layers: list[int]) -> str:
    if len(layers) == 1:
        return f"layer_{layers[0]}"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers_{layers[0]}-{layers[-1]}"
    return "layers_" + "_".join(map(str, layers))


def grouped_layers(num_layers: int, include_last: bool) -> list[int]:
    """The layers that are grouped: all but the last (which gets its own SAE) by default."""
    return list(range(num_layers if include_last or num_layers == 1 else num_layers - 1))


def trained_groups(grouping: gp.Grouping, num_layers: int) -> list[list[int]]:
    """Model layers of every SAE: the grouping's groups, and the last layer alone if it was not
    grouped."""
    own = [[num_layers - 1]] if (num_layers - 1) not in grouping.layers else []
    return grouping.groups() + own


def parse_spec(spec: str) -> tuple[str, int | None]:
    """``auto`` -> (auto, None), ``3`` -> (n, 3), ``per-layer``, ``even:4`` -> (even, 4)."""
    spec = str(spec)
    try:
        if spec in ("auto", "per-layer"):
            return spec, None
        if spec.startswith("even:"):
            return "even", int(spec[5:])
        return "n", int(spec)
    except ValueError:
        raise ValueError(f"{SPEC_HELP}, got {spec!r}") from None


def check_spec(settings: RunSettings, num_layers: int) -> gp.Grouping | None:
    """Every check that needs no data: the spec, G against the number of layers, and a groups
    file against the model. Returns the groups file, if one was given."""
    kind, g = parse_spec(settings.groups)
    layers = grouped_layers(num_layers, settings.include_last)
    if settings.groups_file:
        if kind in ("per-layer", "even"):
            raise ValueError(
                f"--groups {settings.groups} is a layout; it cannot take its groups "
                "from --groups-file"
            )
        grouping = gp.Grouping.load(settings.groups_file)
        if g is not None and g not in grouping.partitions:
            raise ValueError(
                f"--groups {g}: {settings.groups_file} has partitions for G in "
                f"{sorted(grouping.partitions)}"
            )
        return grouping
    top = max(1, len(layers) - 1)  # grouping pays only with a merge: G < grouped layers
    if kind == "n" and not 1 <= g <= top:
        raise ValueError(f"--groups {g}: need 1 <= G <= {top} ({len(layers)} layers are grouped)")
    if kind == "even" and not 1 <= g <= len(layers):
        raise ValueError(f"--groups even:{g}: need 1 <= G <= {len(layers)} layers")
    return None


def same_model(recorded: str, source: str | None, model: LoadedModel) -> bool:
    """Whether a groups file made for ``recorded`` (loaded from ``source``) fits ``model``:
    the same hub id, or the same local directory (not merely the same last path component)."""

    def identity(name: str) -> str:
        if name == "demo":
            return "demo"
        path = Path(name)
        return str(path.resolve()) if path.exists() else hub_id(name).lower()

    mine = {identity(model.name), identity(model.source)}
    return bool({identity(x) for x in (recorded, source) if x} & mine)


def check_file(grouping: gp.Grouping, path: str, model: LoadedModel, include_last: bool) -> None:
    """Refuse a groups file that would train something else than asked: another model, layers
    the model lacks, or layers left without an SAE."""
    n = model.num_layers
    bad = [layer for layer in grouping.layers if layer >= n]
    if bad:
        raise ValueError(f"{path}: layers {bad} out of range for {model.name} ({n} layers)")
    recorded = grouping.extra.get("num_model_layers")
    if recorded is not None and int(recorded) != n:
        raise ValueError(
            f"{path} was made for a model with {recorded} layers; {model.name} has {n}"
        )
    if grouping.model and not same_model(grouping.model, grouping.extra.get("model_source"), model):
        raise ValueError(
            f"{path} was made for model {grouping.model!r}, not {model.name!r} "
            f"({model.source}); measure this model with gsae-groups, or edit the "
            'file\'s "model" if it is the same model elsewhere'
        )
    missing = sorted(set(grouped_layers(n, include_last)) - set(grouping.layers))
    if missing:
        raise ValueError(
            f"{path} groups layers {grouping.layers}: layers {missing} of "
            f"{model.name} ({n} layers) would get no SAE; measure them all with "
            "gsae-groups (--include-last for the last one)"
        )


def resolve(
    settings: RunSettings,
    model: LoadedModel,
    texts: TextSource,
    ctx_len: int,
    from_file: gp.Grouping | None = None,
    batches=None,
    merge=None,
    tokens: int | None = None,
) -> gp.Grouping:
    """The run's grouping, with ``extra["g_trained"]`` the G it trains (``g_hat`` stays the
    AMAD choice when distances were measured). ``batches``, ``merge`` and ``tokens`` (this
    process's budget): a measurement shared by several processes (see gp.measure_model)."""
    kind, g = parse_spec(settings.groups)
    layers = grouped_layers(model.num_layers, settings.include_last)
    if from_file is not None:
        grouping = from_file
    elif kind in ("auto", "n"):
        template = settings.sae_config(model.d_model)
        grouping = gp.measure_model(
            model,
            texts,
            tokens=settings.grouping_tokens if tokens is None else tokens,
            ctx_len=ctx_len,
            batch_size=settings.batch_size,
            repeat=settings.repeat,
            include_last=settings.include_last,
            threshold=settings.threshold,
            expansion_factor=template.m // template.d,
            k=template.k,
            batches=batches,
            merge=merge,
        )
    else:
        labels = list(range(len(layers))) if kind == "per-layer" else gp.even_groups(len(layers), g)
        num = max(labels) + 1
        grouping = gp.Grouping(
            model.name,
            layers,
            [],
            0,
            {num: gp.Partition(labels, float("nan"))},
            num,
            settings.threshold,
            extra={
                "groups_spec": settings.groups,
                "model_source": model.source,
                "num_model_layers": model.num_layers,
            },
        )
    if kind == "n":
        grouping.extra["g_trained"] = g
    elif from_file is None or "g_trained" not in grouping.extra:  # a run's file: its own G
        grouping.extra["g_trained"] = grouping.g_hat
    return grouping
