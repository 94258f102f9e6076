"""Compile every gsae_kernels Triton kernel ahead of time for GPU targets, without a GPU.

Triton ships the NVIDIA (ptxas) and AMD (lld) back ends, so the real code generation, not the
interpreter, can be checked on any machine, and registers and spills read off the result::

    TRITON_INTERPRET=0 python -m gsae_kernels.aot --target cuda:90 --target hip:gfx942

Each kernel is compiled with the launch meta-parameters its host code uses, specialised as
Triton's launcher specialises a real call on contiguous inputs of the given shape (default: the
paper's N = 32768 rows, d = 2048, m = 16 d, k = 128): unit strides become constants, pointers
and the ints divisible by 16 are marked so. NVIDIA registers and spills come from ``ptxas -v``
run with the ptxas Triton itself compiles that target with (Triton bundles two: a CUDA 12 one
for sm < 90 and a newer one for sm_90 and up, whose PTX the older one rejects); AMD ones from
the ``.vgpr_count`` and ``.private_segment_fixed_size`` (scratch memory) metadata of the AMDGCN
assembly; shared memory from the compiled kernel's metadata, checked against each target's limit
(a kernel over it cannot launch: exit status 1); tensor-core instructions counted in the code
(``mma``: PTX ``mma.sync``/``wgmma``, AMDGCN ``v_mfma``). ``--check-spills`` also exits with
status 1 if any kernel spills.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple

P32, PI64 = "*fp32", "*i64"
DEFAULT_TARGETS = ("cuda:80", "cuda:90", "hip:gfx90a", "hip:gfx942")
# shared memory (LDS) one block may use: A100 163 KiB, H100/H200 227 KiB, MI200/MI300 64 KiB
SHARED_LIMIT = {"cuda:80": 166_912, "cuda:90": 232_448, "hip:gfx90a": 65_536, "hip:gfx942": 65_536}
# matrix (tensor-core) instructions: PTX mma.sync / wgmma, AMDGCN v_mfma
_MMA = {"cuda": re.compile(r"\b(?:wgmma\.mma_async|mma\.sync)\b"), "hip": re.compile(r"\bv_mfma")}


class Compiled(NamedTuple):
    """One compiled kernel: its name, target, and ``info`` (registers, spills, shared memory)."""

    kernel: str
    target: str
    info: dict


class Launch(NamedTuple):
    """One kernel launch as the host code makes it: pointer dtypes, int arguments' values and
    the constexpr meta-parameters."""

    name: str
    fn: object
    pointers: dict
    ints: dict
    meta: dict


def _launches(
    dtype: str = P32,
    k: int = 128,
    k_aux: int = 0,
    d: int = 2048,
    n: int = 32768,
    m: int | None = None,
    precision: str = "bf16",
):
    """Every kernel variant :class:`gsae.train.step.SaeTrainer` launches for contiguous ``[n, d]``
    activations, an ``[m, d]`` dictionary (default m = 16 d), ``k`` latents a row and AuxK up
    to ``k_aux`` wide, with the encoder matmul in ``precision`` (the trainer's default on a GPU
    is bf16): the encoder, the decode of the top-k (with b_dec) and of AuxK (without), their
    backwards (``row_dot``, the latent-sorted ``sparse_transpose`` of the encoder, shifted by
    b_dec, with bias sums, and of the decoder, plain) and the loss with and without AuxK."""
    import importlib

    encode = importlib.import_module("gsae_kernels.topk_encode")
    ops = importlib.import_module("gsae_kernels.sparse_ops")
    loss = importlib.import_module("gsae_kernels.loss")
    m = m if m is not None else 16 * d
    w_enc = "*bf16" if precision == "bf16" else dtype  # the bf16 precision's copy of W_enc
    yield Launch(
        f"encode_topk[k={k},{precision}]",
        encode._encode_topk_kernel,
        {
            "X": dtype,
            "W": w_enc,
            "B_ENC": dtype,
            "B_DEC": dtype,
            "VALS": dtype,
            "IDX": PI64,
        },
        {
            "N": n,
            "M": m,
            "D": d,
            "stride_xn": d,
            "stride_xd": 1,
            "stride_wm": d,
            "stride_wd": 1,
            "stride_be": 1,
            "stride_bd": 1,
        },
        {
            "K": k,
            "HAS_B_ENC": True,
            "HAS_B_DEC": True,
            "PRECISION": "tf32" if precision == "tf32" else "ieee",
            **encode.encode_meta(k, "bf16" if w_enc == "*bf16" else precision),
        },
    )
    widths = [(k, True)] + ([(k_aux, False)] if k_aux else [])  # (slots, with b_dec)
    for width, bias in widths:
        yield Launch(
            f"gather_combine[k={width}]",
            ops._gather_combine_kernel,
            {
                "W": dtype,
                "IDX": PI64,
                "T": dtype,
                "BIAS": dtype,
                "OUT": dtype,
            },
            {
                "N": n,
                "D": d,
                "K": width,
                "stride_wn": width,
                "stride_wk": 1,
                "stride_in": width,
                "stride_ik": 1,
                "stride_tm": d,
                "stride_td": 1,
                "stride_b": 1,
            },
            {"HAS_BIAS": bias, **ops.gather_combine_meta(d)},
        )
        yield Launch(
            f"row_dot[k={width}]",
            ops._row_dot_kernel,
            {
                "G": dtype,
                "IDX": PI64,
                "T": dtype,
                "OUT": dtype,
            },
            {
                "N": n,
                "D": d,
                "K": width,
                "stride_gn": d,
                "stride_gd": 1,
                "stride_in": width,
                "stride_ik": 1,
                "stride_tm": d,
                "stride_td": 1,
            },
            ops.row_dot_meta(width, d),
        )
    pointers = {
        "OFFS": PI64,
        "ROWS": PI64,
        "WS": dtype,
        "X": dtype,
        "SHIFT": dtype,
        "PART": P32,
        "PART_B": P32,
        "XOFFS": PI64,
    }
    ints = {
        "M": m,
        "D": d,
        "SPLIT": ops.transpose_split(n * (k + k_aux), m),
        "stride_xn": d,
        "stride_xd": 1,
        "stride_s": 1,
    }
    for side, shifted in (("encoder", True), ("decoder", False)):
        flags = {"HAS_SHIFT": shifted, "HAS_BIAS": shifted}  # the encoder's b_enc sums
        for tail in (True, False):
            yield Launch(
                f"sparse_transpose[{side}{',tail' if tail else ''}]",
                ops._sparse_transpose_kernel,
                {**pointers, "OUT": dtype, "OUT_B": dtype},
                ints,
                {**flags, "HAS_TAIL": tail, **ops.sparse_transpose_meta(d)},
            )
        yield Launch(
            f"transpose_tail[{side}]",
            ops._transpose_tail_kernel,
            {**pointers, "PLAT": PI64},
            ints,
            {**flags, **ops.transpose_tail_meta(d)},
        )
    for aux in (False, True) if k_aux else (False,):
        yield Launch(
            f"fvu_auxk[{'auxk' if aux else 'fvu'}]",
            loss._fvu_auxk_kernel,
            {
                "X": dtype,
                "XH": dtype,
                "XA": dtype,
                "MEAN": P32,
                "GF": P32,
                "GA": P32,
                "PART": P32,
            },
            {
                "N": n,
                "D": d,
                "stride_xn": d,
                "stride_xd": 1,
                "stride_hn": d,
                "stride_hd": 1,
                "stride_an": d,
                "stride_ad": 1,
            },
            {"HAS_AUX": aux, "WRITE_GRAD": True, **loss.loss_meta(d)},
        )


def _source(launch: Launch):
    """``ASTSource`` specialised as Triton's launcher specialises a call: an int equal to 1
    becomes a constexpr, an int divisible by 16 and every pointer (torch allocations are
    aligned) get ``tt.divisibility`` 16."""
    import triton

    fn, meta = launch.fn, dict(launch.meta)
    meta.pop("num_warps")
    signature = dict(launch.pointers)
    divisible = list(launch.pointers)
    for name, value in launch.ints.items():
        if value == 1:
            meta[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                divisible.append(name)
    signature.update({name: "constexpr" for name in meta})
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=meta, attrs=attrs)


def _ptxas(arch: int) -> str:
    """The ptxas Triton compiles ``sm_<arch>`` with."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError):  # older Triton: one bundled ptxas
        import triton

        return os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")


def _ptxas_info(ptx: str, arch: int) -> dict:
    suffix = "a" if arch >= 90 else ""  # Triton targets sm_90a, sm_100a, ...
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        # the flags Triton's own ptxas call uses that change register allocation
        cmd = [
            _ptxas(arch),
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name=sm_{arch}{suffix}",
            f.name,
            "-o",
            os.devnull,
        ]
        run = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr}")
    regs = re.search(r"Used (\d+) registers", run.stderr)
    stores = re.search(r"(\d+) bytes spill stores", run.stderr)
    if regs is None or stores is None:
        raise RuntimeError(f"cannot read registers and spills from ptxas -v:\n{run.stderr}")
    return {"registers": int(regs.group(1)), "spill_bytes": int(stores.group(1))}


def _amdgcn_info(asm: str) -> dict:
    """VGPRs, and the scratch memory a lane spills to (``private_segment_fixed_size``); SGPR
    spills go to VGPR lanes, not memory, and are reported apart."""
    vgpr = re.search(r"\.vgpr_count:\s+(\d+)", asm)
    scratch = re.search(r"\.private_segment_fixed_size:\s+(\d+)", asm)
    sgpr_spills = re.search(r"\.sgpr_spill_count:\s+(\d+)", asm)
    if vgpr is None or scratch is None:
        raise RuntimeError("cannot read registers and spills from the AMDGCN metadata")
    return {
        "registers": int(vgpr.group(1)),
        "spill_bytes": int(scratch.group(1)),
        "sgpr_spills_to_vgpr": int(sgpr_spills.group(1)) if sgpr_spills else 0,
    }


def compile_all(targets: list[str], kernels=None, **shape) -> list[Compiled]:
    """Compile every kernel (or those whose name contains one of ``kernels``) for every target
    (``cuda:<sm>`` or ``hip:<gfx arch>``)."""
    import triton
    from triton.backends.compiler import GPUTarget

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    results = []
    for spec in targets:
        backend, _, arch = spec.partition(":")
        if backend not in ("cuda", "hip") or not arch:
            raise ValueError(f"a target is cuda:<sm> or hip:<gfx arch>, got {spec!r}")
        target = GPUTarget(
            backend, int(arch) if backend == "cuda" else arch, 32 if backend == "cuda" else 64
        )
        for launch in _launches(**shape):
            if kernels and not any(part in launch.name for part in kernels):
                continue
            options = {"num_warps": launch.meta["num_warps"]}
            compiled = triton.compile(_source(launch), target=target, options=options)
            code = compiled.asm["ptx" if backend == "cuda" else "amdgcn"]
            info = _ptxas_info(code, int(arch)) if backend == "cuda" else _amdgcn_info(code)
            info["shared_bytes"] = compiled.metadata.shared
            info["mma"] = len(_MMA[backend].findall(code))
            results.append(Compiled(launch.name, spec, info))
    return results


def shared_limit(target: str) -> int | None:
    """Bytes of shared memory a block may use on ``target`` (None: not known here)."""
    return SHARED_LIMIT.get(target)


def violations(results: list[Compiled], spills: bool) -> list[str]:
    """Kernels over their target's shared memory (they cannot launch: OutOfResources) and,
    with ``spills``, kernels that spill registers."""
    bad = []
    for r in results:
        limit = shared_limit(r.target)
        if limit is not None and r.info["shared_bytes"] > limit:
            bad.append(
                f"{r.target} {r.kernel}: {r.info['shared_bytes']} bytes of shared memory "
                f"> the {limit} a block may use"
            )
        if spills and r.info["spill_bytes"]:
            bad.append(f"{r.target} {r.kernel}: {r.info['spill_bytes']} bytes of register spills")
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    help_target = f"cuda:<sm> or hip:<gfx>, repeatable (default: {' '.join(DEFAULT_TARGETS)})"
    parser.add_argument("--target", action="append", default=None, help=help_target)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--k-aux", type=int, default=0, help="widest AuxK (default 0: none)")
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--n", type=int, default=32768, help="rows a batch (default 32768)")
    parser.add_argument("--m", type=int, default=None, help="latents (default 16 d)")
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="activations and weights (the trainer's: fp32)",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "tf32", "bf16"],
        default="bf16",
        help="the encoder matmul's (default bf16: the trainer's on a GPU)",
    )
    parser.add_argument("--check-spills", action="store_true", help="exit 1 if a kernel spills")
    parser.add_argument(
        "--kernel",
        action="append",
        default=None,
        help="compile only the kernels whose name contains this (repeatable)",
    )
    args = parser.parse_args(argv)
    targets = args.target or list(DEFAULT_TARGETS)
    shape = {
        "k": args.k,
        "k_aux": args.k_aux,
        "d": args.d,
        "n": args.n,
        "m": args.m,
        "dtype": "*" + args.dtype,
        "precision": args.precision,
    }
    results = compile_all(targets, args.kernel, **shape)
    for r in results:
        print(f"{r.target:<12} {r.kernel:<32} {r.info}")
    for r in results:
        if r.kernel.startswith("encode_topk"):
            cores = "on" if r.info["mma"] else "NOT on"
            print(
                f"{r.target:<12} {r.kernel}: matmul {cores} tensor cores ({r.info['mma']} "
                "mma/wgmma/mfma instructions)"
            )
    bad = violations(results, args.check_spills)
    if bad:
        print("over the limits:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
