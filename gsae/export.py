"""Trained Group-SAEs in the formats other tools load: EleutherAI's sparsify and SAELens.

Both formats hold one SAE per *hookpoint* (a model layer), so a group SAE is written once for
each layer of its group, with that layer's activation scale folded into the weights
(:func:`fold_scale`): every exported SAE takes and returns the model's own activations.

- **sparsify** (``SparseCoder.load_from_disk`` / ``load_many``, and what EleutherAI's delphi
  auto-interp pipeline reads): ``OUT/<hookpoint>/cfg.json`` (``d_in``, ``num_latents``, ``k``,
  ``activation``, ...) and ``sae.safetensors`` (``encoder.weight [m, d]``, ``encoder.bias [m]``,
  ``W_dec [m, d]``, ``b_dec [d]``). A hookpoint is the layer's module name inside the model's
  base model, as sparsify's trainer names them: ``layers.5`` (GPT-NeoX, Llama), ``h.5``
  (GPT-2), ``encoder.layer.5`` (BERT) (:func:`gsae.activations.layer_prefix`).
- **SAELens** (``SAE.load_from_disk``, version >= 6): ``OUT/blocks.L.hook_resid_post/cfg.json``
  (``architecture: topk``, ``d_in``, ``d_sae``, ``k``, ``metadata.hook_name``, ...) and
  ``sae_weights.safetensors`` (``W_enc [d, m]``, i.e. SAELens' input-major orientation,
  ``b_enc [m]``, ``W_dec [m, d]``, ``b_dec [d]``). ``hook_resid_post`` of block L is the
  residual stream after layer L, which is what gsae trains on.

``OUT/gsae_export.json`` records the run, and for each hookpoint its layer, group and the
scale that was folded in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

import torch

from .hf.hub import hub_id
from .hf.models import ModelLoadError, layer_prefix, load_structure
from .io import atomic_dir, save_safetensors
from .outdir import claim, write_marker
from .run import FinishedRun, load_run
from .sae import SPARSIFY_NAMES, Sae

FORMATS = ("sparsify", "saelens")
MANIFEST = "gsae_export.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_VERSION = "6.0.0"  # the config layout written here: SAELens 6 (metadata block)
PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")  # a dotted module name, no path


class Folded(NamedTuple):
    """One layer's SAE in the model's units: ``W_enc [m, d]``, ``b_enc [m]``, ``W_dec [m, d]``
    (unit rows), ``b_dec [d]``, all float32."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor


@torch.no_grad()
def fold_scale(sae: Sae, layer: int) -> Folded:
    """``sae``'s weights at ``layer`` with the layer's activation scale s folded in.

    gsae's SAE acts on ``s x`` (x in model units, s > 0):

        z     = W_enc (s x - b_dec) + b_enc            pre-activations, top-k selected on z
        f     = relu(z) on the top-k latents
        x_hat = (W_dec^T f + b_dec) / s                back in model units

    Dividing z by s changes no comparison between latents (s > 0), so the same top-k is
    selected, and relu(z / s) = relu(z) / s. With

        W_enc' = W_enc,   b_enc' = b_enc / s,   b_dec' = b_dec / s,   W_dec' = W_dec

    the exported SAE computes, on x itself:

        z'     = W_enc (x - b_dec / s) + b_enc / s = z / s
        f'     = relu(z') on the same top-k = f / s
        x_hat' = W_dec^T f' + b_dec / s = (W_dec^T f + b_dec) / s = x_hat

    so it takes and returns model units with no scale and selects exactly the same latents.
    W_enc and W_dec are untouched, which keeps the decoder rows unit-norm as both formats
    declare (sparsify's ``normalize_decoder``; SAELens' TopK SAE with
    ``rescale_acts_by_decoder_norm: false``) and as any later fine-tuning with them would
    enforce; the factor moves into the biases and the latent values, which are then in model
    units: f' = f / s is the length, in the model's units, of each latent's contribution
    along its unit decoder row. (Scaling W_enc by s and W_dec by 1/s instead would keep f as
    gsae reports it, but leave decoder rows of norm 1/s.)
    """
    s = float(sae.scale_for(layer))
    return Folded(
        sae.W_enc.detach().float().cpu().clone(),
        (sae.b_enc.detach().double() / s).float().cpu(),
        sae.W_dec.detach().float().cpu().clone(),
        (sae.b_dec.detach().double() / s).float().cpu(),
    )


# --------------------------------------------------------------------------------------------
# The two formats, one folder per layer
# --------------------------------------------------------------------------------------------


def sparsify_files(w: Folded, k: int) -> tuple[dict[str, torch.Tensor], dict]:
    """sparsify's tensors and ``cfg.json`` (``SparseCoderConfig`` keys plus ``d_in``)."""
    m, d = w.W_enc.shape
    tensors = {SPARSIFY_NAMES[name]: getattr(w, name).contiguous() for name in Folded._fields}
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, m // d),
        "normalize_decoder": True,
        "num_latents": m,
        "k": k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": d,
    }
    return tensors, cfg


def saelens_files(
    w: Folded, k: int, layer: int, metadata: dict
) -> tuple[dict[str, torch.Tensor], dict]:
    """SAELens' tensors (``W_enc`` transposed to ``[d, m]``) and TopK ``cfg.json``."""
    m, d = w.W_enc.shape
    tensors = {
        "W_enc": w.W_enc.T.contiguous(),
        "b_enc": w.b_enc.contiguous(),
        "W_dec": w.W_dec.contiguous(),
        "b_dec": w.b_dec.contiguous(),
    }
    cfg = {
        "architecture": "topk",
        "d_in": d,
        "d_sae": m,
        "k": k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": None,
            "hook_name": saelens_hook(layer),
            "hook_layer": layer,
            "hook_head_index": None,
            **metadata,
        },
    }
    return tensors, cfg


def saelens_hook(layer: int) -> str:
    """TransformerLens' name for the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


class Exported(NamedTuple):
    """One exported folder: its name (the hookpoint), the model layer, the gsae group it came
    from and the scale folded into it."""

    name: str
    layer: int
    group: str
    scale: float


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: str | Path,
    *,
    prefix: str | None = None,
    model: str | None = None,
    overwrite: bool = False,
) -> list[Exported]:
    """Write every SAE of the gsae-train run ``run_dir`` in ``fmt`` (``sparsify`` or
    ``saelens``) into ``out``, one folder per model layer, replacing ``out`` as a whole.

    ``prefix``: sparsify's hookpoint prefix (default: the model's layer list, read from its
    config without its weights; ``model`` names another copy of the model, which must have the
    run's layers and width). ``out`` may be a previous export (it is replaced); see
    :func:`gsae.outdir.check_out` for the folders refused."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if prefix and not PREFIX.fullmatch(prefix):  # "" names the hookpoints by number
        raise ValueError(
            f"--hookpoint-prefix {prefix!r} is not a module name (letters, digits, "
            "_ and - between dots, e.g. layers or gpt_neox.layers)"
        )
    run = load_run(run_dir)
    out = Path(out)
    with claim(out, "gsae-export", inputs=[run.path], overwrite=overwrite):
        structure = _check_model(run, model) if model else None
        if fmt == "sparsify" and prefix is None:
            try:
                prefix = layer_prefix(structure or load_structure(run.model))
            except ModelLoadError as err:
                raise ModelLoadError(
                    f"{err} (gsae-export reads only the model's config, to name "
                    "the hookpoints: pass --hookpoint-prefix, e.g. layers for "
                    "GPT-NeoX and Llama, h for GPT-2)"
                ) from None
        return _write(run, fmt, out, prefix)


def _check_model(run: FinishedRun, model: str):
    """``model``'s structure, refused unless it has the run's layers and width."""
    structure = load_structure(model)
    widths = {e.d for e in run.saes}
    if structure.num_layers != run.num_model_layers or {structure.d_model} != widths:
        raise ValueError(
            f"--model {model} has {structure.num_layers} layers of width "
            f"{structure.d_model}; the run's model {run.model} has "
            f"{run.num_model_layers} of width {', '.join(map(str, sorted(widths)))}: "
            "not a copy of it"
        )
    return structure


def _write(run: FinishedRun, fmt: str, out: Path, prefix: str | None) -> list[Exported]:
    metadata = {
        "model_name": hub_id(run.model),
        "context_size": int(run.arg("ctx_len", 0)),
        "prepend_bos": False,
        "dataset_path": run.arg("dataset"),
        "model_from_pretrained_kwargs": {},
    }
    exported: list[Exported] = []
    with atomic_dir(out) as tmp:
        for entry in run.saes:
            sae = entry.load("cpu")
            for layer in sae.layers:
                w = fold_scale(sae, layer)
                if fmt == "sparsify":
                    name = f"{prefix}.{layer}" if prefix else str(layer)
                    tensors, cfg = sparsify_files(w, sae.k)
                    weights = "sae.safetensors"
                else:
                    name = saelens_hook(layer)
                    tensors, cfg = saelens_files(w, sae.k, layer, metadata)
                    weights = SAELENS_WEIGHTS
                folder = tmp / name
                folder.mkdir()
                save_safetensors(tensors, folder / weights)
                (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
                exported.append(Exported(name, layer, entry.name, float(sae.scale_for(layer))))
        manifest = {
            "format": fmt,
            "run": str(run.path.resolve()),
            "model": run.model,
            "dataset": run.arg("dataset"),
            "split": run.arg("split"),
            "column": run.arg("column"),
            "ctx_len": run.arg("ctx_len"),
            "num_model_layers": run.num_model_layers,
            "hookpoints": {
                e.name: {"layer": e.layer, "group": e.group, "scale": e.scale} for e in exported
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        write_marker(tmp, "gsae-export")
    return exported
