#!/usr/bin/env python
"""Peer baseline: llama.cpp's own quantizer (k-quant mixes, no imatrix).

Run with the *bench* virtual environment (see bench/peers/README.md), never the
main one:

    .venv-bench/bin/python bench/peers/llamacpp_quant.py \
        --model HF_DIR --ftype Q4_K_M|Q3_K_M|Q2_K --out OUTDIR \
        [--llama-cpp-dir DIR] [--src-gguf PATH] [--threads T]

Steps:
  1. HF dir -> F32 GGUF with llama.cpp's ``convert_hf_to_gguf.py`` (the copy that ships in
     the llama-cpp-python sdist, vendor/llama.cpp/, same llama.cpp commit as the compiled
     library). The F32 GGUF is cached at --src-gguf (default
     OUTDIR/../llamacpp_src/<model>-f32.gguf) and reused if present.
  2. Check that the F32 GGUF reproduces the HF weights *exactly* for every block linear,
     after undoing the convert script's llama q/k RoPE row permutation.
  3. ``llama_cpp.llama_model_quantize`` with ``llama_model_quantize_default_params()``,
     only ``ftype`` (and ``nthread``) changed: no imatrix, default tensor-type rules. Timed.
  4. Read the quantized GGUF with ``gguf.GGUFReader``, dequantize each block linear with
     ``gguf.quants.dequantize`` (cross-checked against ggml's own C ``to_float``), undo the
     q/k permutation, and write HF names.

Outputs in OUTDIR:
  model-<FTYPE>.gguf        llama.cpp's quantized model
  quantize.log              llama.cpp's log of the quantize call (tensor types, fallbacks)
  dequantized.safetensors   "model.layers.N.<proj>.weight" float32 for every block linear
  result.json               timings, sizes (real GGUF tensor bytes), tensor types, checks
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from importlib.metadata import version as pkg_version
from pathlib import Path

import numpy as np

# GGUF block-tensor name -> HF module suffix (llama architecture)
GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
FTYPES = ("Q4_K_M", "Q3_K_M", "Q2_K", "Q4_K_S", "Q3_K_S", "Q3_K_L", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0")
DEFAULT_LLAMA_CPP_DIR = Path(__file__).resolve().parents[2] / ".venv-bench" / "src" / "llama.cpp"

LOAD0 = None  # 1-min load average at start (timings are only meaningful on an idle machine)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="float HF checkpoint directory (llama architecture)")
    p.add_argument("--ftype", required=True, choices=FTYPES)
    p.add_argument("--out", required=True)
    p.add_argument("--llama-cpp-dir", default=os.environ.get("LLAMA_CPP_DIR", str(DEFAULT_LLAMA_CPP_DIR)),
                   help="llama.cpp source tree holding convert_hf_to_gguf.py (vendor/llama.cpp of the "
                        "llama-cpp-python sdist); default $LLAMA_CPP_DIR or .venv-bench/src/llama.cpp")
    p.add_argument("--src-gguf", default=None, help="F32 GGUF to (re)use; created if missing")
    p.add_argument("--src-outtype", default="f32", choices=["f32", "f16", "bf16"],
                   help="convert_hf_to_gguf --outtype of the source GGUF (default f32 = lossless)")
    p.add_argument("--threads", type=int, default=0, help="llama_model_quantize nthread (0 = hardware_concurrency)")
    return p.parse_args()


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of LlamaModel.permute in convert_hf_to_gguf (rows of q/k reordered for RoPE)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def block_linears(reader):
    """Yield (tensor, layer_idx, gguf_kind, hf_name) for the block linear tensors."""
    for t in reader.tensors:
        p = t.name.split(".")
        if len(p) == 4 and p[0] == "blk" and p[3] == "weight" and p[2] in GGUF_TO_HF:
            yield t, int(p[1]), p[2], f"model.layers.{p[1]}.{GGUF_TO_HF[p[2]]}.weight"


def deq_tensor(t) -> np.ndarray:
    from gguf.quants import dequantize
    w = dequantize(t.data, t.tensor_type)
    return np.ascontiguousarray(w, dtype=np.float32)


class GGMLToFloat:
    """ggml's own C dequantizer (ggml_get_type_traits(type)->to_float), for cross-checking gguf-py."""

    class _Traits(ctypes.Structure):
        _fields_ = [
            ("type_name", ctypes.c_char_p),
            ("blck_size", ctypes.c_int64),
            ("blck_size_interleave", ctypes.c_int64),
            ("type_size", ctypes.c_size_t),
            ("is_quantized", ctypes.c_bool),
            ("to_float", ctypes.c_void_p),
            ("from_float_ref", ctypes.c_void_p),
        ]

    def __init__(self):
        import llama_cpp
        libdir = Path(llama_cpp.__file__).parent / "lib"
        cands = sorted(libdir.glob("libggml-base.so*")) + sorted(libdir.glob("libggml.so*"))
        self.lib = None
        for c in cands:
            try:
                lib = ctypes.CDLL(str(c))
                lib.ggml_get_type_traits.restype = ctypes.POINTER(self._Traits)
                lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
                self.lib = lib
                break
            except (OSError, AttributeError):
                continue
        self.fn_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)

    def __call__(self, t) -> np.ndarray | None:
        if self.lib is None:
            return None
        tr = self.lib.ggml_get_type_traits(int(t.tensor_type)).contents
        if not tr.to_float:
            return None
        src = np.ascontiguousarray(t.data)
        n = int(np.prod([int(x) for x in t.shape]))
        out = np.empty(n, dtype=np.float32)
        self.fn_t(tr.to_float)(src.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
        return out.reshape(deq_tensor_shape(t))


def deq_tensor_shape(t):
    return tuple(int(x) for x in reversed(list(t.shape)))


def convert_to_gguf(args, src: Path) -> float:
    conv = Path(args.llama_cpp_dir) / "convert_hf_to_gguf.py"
    if not conv.is_file():
        raise SystemExit(f"{conv} not found: point --llama-cpp-dir at vendor/llama.cpp of the llama-cpp-python sdist")
    src.parent.mkdir(parents=True, exist_ok=True)
    tmp = src.with_suffix(".tmp.gguf")
    cmd = [sys.executable, str(conv), str(args.model), "--outtype", args.src_outtype, "--outfile", str(tmp)]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    (src.parent / (src.name + ".convert.log")).write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
        raise SystemExit(f"convert_hf_to_gguf failed (rc={r.returncode})")
    tmp.rename(src)
    return dt


def verify_src_roundtrip(src: Path, model_dir: Path, n_head: int, n_kv: int, exact: bool) -> dict:
    from gguf import GGUFReader
    from safetensors.numpy import load_file

    hf = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        hf.update(load_file(str(f)))
    r = GGUFReader(str(src))
    n = n_bad = 0
    max_abs = 0.0
    q_perm_is_real = None
    for t, bid, kind, hfname in block_linears(r):
        w = deq_tensor(t)
        if kind == "attn_q":
            if q_perm_is_real is None:
                q_perm_is_real = not np.array_equal(w, hf[hfname].astype(np.float32))
            w = unpermute(w, n_head)
        elif kind == "attn_k":
            w = unpermute(w, n_kv)
        o = hf[hfname].astype(np.float32)
        n += 1
        if w.shape != o.shape:
            raise SystemExit(f"source GGUF shape mismatch for {hfname}: {w.shape} vs {o.shape}")
        d = float(np.abs(w - o).max())
        max_abs = max(max_abs, d)
        if not np.array_equal(w, o):
            n_bad += 1
    if n != 7 * len({k.split(".")[2] for k in hf if k.startswith("model.layers.")}):
        raise SystemExit(f"found {n} block linears in source GGUF, unexpected")
    if exact and n_bad:
        raise SystemExit(f"F32 GGUF round trip is not exact for {n_bad}/{n} block linears (max abs diff {max_abs})")
    return {"n_block_linears": n, "n_not_identical": n_bad, "max_abs_diff": max_abs,
            "q_rows_permuted_in_gguf": q_perm_is_real}


def quantize(args, src: Path, dst: Path, log_path: Path) -> tuple[float, int, dict]:
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    defaults = {f: getattr(params, f) for f, _ in params._fields_ if not f in
                ("imatrix", "kv_overrides", "tt_overrides", "prune_layers")}
    defaults["imatrix_is_null"] = not bool(params.imatrix)
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{args.ftype}")
    params.nthread = args.threads
    # llama.cpp logs to stderr (fd 2) from C: capture it into quantize.log
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(str(log_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    try:
        t0 = time.perf_counter()
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        wall = time.perf_counter() - t0
    finally:
        os.dup2(saved, 2)
        os.close(fd)
        os.close(saved)
    if rc != 0:
        sys.stderr.write(log_path.read_text()[-4000:])
        raise SystemExit(f"llama_model_quantize failed rc={rc}")
    return wall, int(params.ftype), defaults


def main() -> int:
    global LOAD0
    LOAD0 = os.getloadavg()[0]
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model).expanduser().resolve()
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        print(f"WARNING: model_type={cfg.get('model_type')}, the tensor map assumes llama", file=sys.stderr)
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads", n_head))

    import llama_cpp
    from gguf import GGUFReader
    from safetensors.numpy import load_file, save_file

    # ---------------- 1-2. float GGUF + exact round-trip check ----------------------
    src = (Path(args.src_gguf) if args.src_gguf
           else out.parent / "llamacpp_src" / f"{model_dir.name}-{args.src_outtype}.gguf").resolve()
    convert_s = None
    if not src.is_file():
        convert_s = convert_to_gguf(args, src)
    src_check = verify_src_roundtrip(src, model_dir, n_head, n_kv, exact=(args.src_outtype == "f32"))
    print(f"source GGUF {src}: round trip {src_check}", flush=True)

    # ---------------- 3. the timed call ---------------------------------------------
    dst = out / f"model-{args.ftype}.gguf"
    wall, ftype_id, default_params = quantize(args, src, dst, out / "quantize.log")
    print(f"llama_model_quantize wall time: {wall:.2f} s", flush=True)
    log = (out / "quantize.log").read_text(errors="replace")
    fallback_lines = [l.strip() for l in log.splitlines() if "falling back" in l]
    fallback_summary = [l.strip() for l in log.splitlines() if "required fallback" in l]

    # ---------------- 4. read back, sizes, dequantize -------------------------------
    hf = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        hf.update(load_file(str(f)))
    r = GGUFReader(str(dst))
    ggml_deq = GGMLToFloat()
    deq: dict[str, np.ndarray] = {}
    types_by_kind: dict[str, Counter] = defaultdict(Counter)
    bytes_by_type: Counter = Counter()
    params_by_type: Counter = Counter()
    per_tensor = {}
    q_bytes = 0
    n_params = 0
    num = den = 0.0
    max_diff_vs_ggml = 0.0
    n_ggml_checked = 0
    for t, bid, kind, hfname in block_linears(r):
        tname = t.tensor_type.name
        nb = int(t.n_bytes)
        ne = int(t.n_elements)
        q_bytes += nb
        n_params += ne
        types_by_kind[kind][tname] += 1
        bytes_by_type[tname] += nb
        params_by_type[tname] += ne
        w = deq_tensor(t)
        ref = ggml_deq(t)
        if ref is not None:
            max_diff_vs_ggml = max(max_diff_vs_ggml, float(np.abs(ref - w).max()))
            n_ggml_checked += 1
        if kind == "attn_q":
            w = unpermute(w, n_head)
        elif kind == "attn_k":
            w = unpermute(w, n_kv)
        o = hf[hfname].astype(np.float32)
        assert w.shape == o.shape, (hfname, w.shape, o.shape)
        e2 = float(((w.astype(np.float64) - o) ** 2).sum())
        o2 = float((o.astype(np.float64) ** 2).sum())
        num += e2
        den += o2
        per_tensor[hfname] = {"gguf_name": t.name, "type": tname, "bytes": nb, "n": ne,
                              "bits_per_weight": 8 * nb / ne, "rel_frobenius_error": (e2 / o2) ** 0.5}
        deq[hfname] = np.ascontiguousarray(w, dtype=np.float32)
    if not deq:
        raise SystemExit("no block linears found in quantized GGUF")
    save_file(deq, str(out / "dequantized.safetensors"))

    # non-block tensors (token_embd / output / norms): types and sizes, reported separately
    other = {}
    emb_err = None
    for t in r.tensors:
        if t.name.startswith("blk."):
            continue
        other[t.name] = {"type": t.tensor_type.name, "bytes": int(t.n_bytes), "n": int(t.n_elements),
                         "shape_ggml": [int(x) for x in t.shape]}
        if t.name == "token_embd.weight" and "model.embed_tokens.weight" in hf:
            we = deq_tensor(t)
            oe = hf["model.embed_tokens.weight"].astype(np.float32)
            if we.shape == oe.shape:
                emb_err = float(np.linalg.norm(we - oe) / np.linalg.norm(oe))
                other[t.name]["rel_frobenius_error"] = emb_err
    norm_bytes = sum(int(t.n_bytes) for t in r.tensors if t.name.startswith("blk.") and t.name.split(".")[2] not in GGUF_TO_HF)

    meta = {}
    for key in ("general.file_type", "general.quantization_version"):
        f = r.fields.get(key)
        if f is not None:
            meta[key] = int(f.parts[f.data[0]][0])

    sample = [k for k in deq if k.startswith(("model.layers.0.", "model.layers.15.", "model.layers.29."))]
    result = {
        "tool": "llama.cpp",
        "version": llama_cpp.__version__,
        "llama_cpp_python_version": pkg_version("llama_cpp_python"),
        "gguf_version": pkg_version("gguf"),
        "ftype": args.ftype,
        "ftype_id": ftype_id,
        "ftype_name": (llama_cpp.llama_ftype_name(ftype_id) or b"").decode() if hasattr(llama_cpp, "llama_ftype_name") else None,
        "imatrix": None,
        "quantize_default_params": default_params,
        "source_gguf": str(src),
        "source_outtype": args.src_outtype,
        "convert_wall_time_s": convert_s,
        "wall_time_s": wall,
        "threads": args.threads if args.threads > 0 else os.cpu_count(),
        "threads_arg": args.threads,
        "loadavg_1m_before_after": [LOAD0, os.getloadavg()[0]],
        "cpu_count": os.cpu_count(),
        "quantized_gguf_file_bytes": dst.stat().st_size,
        "quantized_linear_bytes": q_bytes,
        "n_quantized_params": n_params,
        "bits_per_quantized_param": 8 * q_bytes / n_params,
        "block_linear_types": {k: dict(v) for k, v in sorted(types_by_kind.items())},
        "block_linear_bytes_by_type": dict(bytes_by_type),
        "block_linear_params_by_type": dict(params_by_type),
        "block_norm_bytes": norm_bytes,
        "non_block_tensors": other,
        "token_embd_type": other.get("token_embd.weight", {}).get("type"),
        "output_type": other.get("output.weight", {}).get("type", "tied to token_embd (no output.weight)"),
        "gguf_meta": meta,
        "n_fallback_warnings": len(fallback_lines),
        "fallback_summary": fallback_summary,
        "fallback_lines": fallback_lines[:400],
        "per_tensor": per_tensor,
        "checks": {
            "source_roundtrip": src_check,
            "max_abs_diff_ggufpy_vs_ggml_to_float": max_diff_vs_ggml if n_ggml_checked else None,
            "n_checked_vs_ggml": n_ggml_checked,
            "rel_weight_mse_vs_original": num / den,
            "rel_frobenius_error_total": (num / den) ** 0.5,
            "rel_frobenius_error_sample": {k: per_tensor[k]["rel_frobenius_error"] for k in sample},
            "token_embd_rel_frobenius_error": emb_err,
            "n_quantized_modules": len(deq),
        },
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    brief = {k: v for k, v in result.items() if k not in ("per_tensor", "fallback_lines")}
    print(json.dumps(brief, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
