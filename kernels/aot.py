"""Compile every gsae_kernels Triton kernel ahead of time for GPU targets, without a GPU.

Triton ships the NVIDIA (ptxas) and AMD (lld) back ends, so the real code generation, not the
interpreter, can be checked on any machine, and registers and spills read off the result::

    TRITON_INTERPRET=0 python -m gsae_kernels.aot --target cuda:80 --target hip:gfx90a

Each kernel is compiled with the launch meta-parameters its host code uses.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from typing import NamedTuple

P32, PI64 = "*fp32", "*i64"


class Compiled(NamedTuple):
    """One compiled kernel: its name, target, and ``info`` (registers, spills, shared memory)."""

    kernel: str
    target: str
    info: dict


def _kernels(dtype: str = P32, k: int = 128, k_aux: int = 0, d: int = 2048):
    import importlib

    encode = importlib.import_module("gsae_kernels.topk_encode")
    ops = importlib.import_module("gsae_kernels.sparse_ops")
    loss = importlib.import_module("gsae_kernels.loss")
    i32 = "i32"
    enc_meta = encode.encode_meta(k, k_aux)
    yield f"encode_topk[k={k},k_aux={k_aux}]", encode._encode_topk_kernel, {
        "X": dtype, "W": dtype, "B_ENC": dtype, "B_DEC": dtype, "DEAD": "*i8", "VALS": dtype,
        "IDX": PI64, "AVALS": dtype, "AIDX": PI64, "N": i32, "M": i32, "D": i32,
        "stride_x": i32, "stride_w": i32,
    }, {"K": k, "KA": max(k_aux, 1), "HAS_AUX": k_aux > 0, "PRECISION": "ieee",
        **enc_meta}  # fmt: skip
    yield "gather_combine", ops._gather_combine_kernel, {
        "W": dtype, "IDX": PI64, "T": dtype, "BIAS": dtype, "OUT": dtype,
        "N": i32, "D": i32, "K": i32, "stride_t": i32, "stride_o": i32,
    }, {"HAS_BIAS": True, **ops.gather_combine_meta(d)}  # fmt: skip
    yield "row_dot", ops._row_dot_kernel, {
        "G": dtype, "IDX": PI64, "T": dtype, "OUT": dtype,
        "N": i32, "D": i32, "K": i32, "stride_g": i32, "stride_t": i32,
    }, ops.row_dot_meta(k, d)  # fmt: skip
    yield "sparse_transpose", ops._sparse_transpose_kernel, {
        "OFFS": PI64, "ROWS": PI64, "WS": dtype, "X": dtype, "OUT": dtype, "OUT_B": dtype,
        "M": i32, "D": i32, "stride_x": i32, "stride_o": i32,
    }, {"HAS_BIAS": True, **ops.sparse_transpose_meta(d)}  # fmt: skip
    yield "fvu_auxk", loss._fvu_auxk_kernel, {
        "X": dtype, "XH": dtype, "XA": dtype, "MEAN": P32, "GF": P32, "GA": P32, "PART": P32,
        "N": i32, "D": i32, "stride_x": i32, "stride_xh": i32, "stride_xa": i32,
    }, {"HAS_AUX": True, "WRITE_GRAD": True, **loss.loss_meta(d)}  # fmt: skip


def _ptxas_info(ptx: str, arch: int) -> dict:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        cmd = [ptxas, "-v", f"--gpu-name=sm_{arch}", f.name, "-o", os.devnull]
        err = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", err)
    spill = re.search(r"(\d+) bytes spill stores", err)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spill.group(1)) if spill else None}  # fmt: skip


def _amdgcn_info(asm: str) -> dict:
    vgpr = re.search(r"\.vgpr_count:\s+(\d+)", asm)
    spill = re.search(r"\.vgpr_spill_count:\s+(\d+)", asm)
    return {"registers": int(vgpr.group(1)) if vgpr else None,
            "spill_bytes": int(spill.group(1)) * 4 if spill else None}  # fmt: skip


def compile_all(targets: list[str], **shape) -> list[Compiled]:
    """Compile every kernel for every target (``cuda:<sm>`` or ``hip:<gfx arch>``)."""
    import triton
    from triton.backends.compiler import GPUTarget

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    results = []
    for spec in targets:
        backend, arch = spec.split(":")
        target = GPUTarget(backend, int(arch) if backend == "cuda" else arch,
                           32 if backend == "cuda" else 64)  # fmt: skip
        for name, fn, signature, meta in _kernels(**shape):
            meta = dict(meta)
            num_warps = meta.pop("num_warps")
            sig = {**signature, **{key: "constexpr" for key in meta}}
            src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=meta)
            compiled = triton.compile(src, target=target, options={"num_warps": num_warps})
            if backend == "cuda":
                info = _ptxas_info(compiled.asm["ptx"], int(arch))
            else:
                info = _amdgcn_info(compiled.asm["amdgcn"])
            info["shared_bytes"] = compiled.metadata.shared
            results.append(Compiled(name, spec, info))
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    help_target = "cuda:<sm> or hip:<gfx>, repeatable (default: cuda:80 and hip:gfx90a)"
    parser.add_argument("--target", action="append", default=None, help=help_target)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--k-aux", type=int, default=0)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    args = parser.parse_args(argv)
    targets = args.target or ["cuda:80", "hip:gfx90a"]
    shape = {"k": args.k, "k_aux": args.k_aux, "d": args.d, "dtype": "*" + args.dtype}
    for r in compile_all(targets, **shape):
        print(f"{r.target:<12} {r.kernel:<28} {r.info}")


if __name__ == "__main__":
    main()
