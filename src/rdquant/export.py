"""Export an rdquant artifact to a format other tools load: `compressed-tensors` (pack-quantized, what
llm-compressor writes and transformers and vLLM read) and `gptq` (qweight / qzeros / scales / g_idx,
what GPTQModel, AutoGPTQ and transformers' GPTQ integration read) and `gguf` (llama.cpp; export_gguf.py).

Every layer is checked against the target format before anything is read or written: a layer the
format cannot hold exactly (a codebook or mixed-width layout, a group that does not divide the row) is
refused with its name and the reason, never silently re-quantized. The export is written next to OUT
and renamed into place when complete; it carries a marker so a later `--overwrite` may replace it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import safety
from .errors import RdquantError

FORMATS = ("compressed-tensors", "gptq", "gguf")


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors weight scheme: a width, a group size (-1: one scale per output channel)
    and symmetry."""

    bits: int
    group_size: int
    symmetric: bool


def check_kv(manifest: dict[str, Any], format: str) -> None:
    """Refuse an artifact whose KV-cache shifts live in v_proj / o_proj biases (the format's architecture has
    none); other KV-quantized artifacts export with a 16-bit cache (the weights are unchanged by it)."""
    recipe = manifest.get("recipe", {})
    if isinstance(manifest.get("kv_cache"), dict) and (recipe.get("kv_shift") or recipe.get("kv_crr")):
        raise RdquantError(f"this artifact's KV shifts are folded into v_proj / o_proj biases, which {format} has no "
                           "place for; compress without --kv-shift and --kv-crr (the defaults) to export")


def plan(quantized: dict[str, dict[str, Any]], format: str) -> dict[str, Scheme]:
    """The scheme of every quantized layer (manifest entries) in `format`, or an RdquantError naming the
    first layer the format cannot hold exactly and how many more there are."""
    out, bad = {}, []
    for name, info in quantized.items():
        layout, bits, g = info.get("layout", "affine"), info["bits"], info["group_size"]
        out_f, in_f = info["shape"]
        if info.get("kind", "linear") != "linear":
            bad.append((name, f"it is the quantized {info['kind']} ({format} holds the decoder linears only); "
                              "compress with --embed-bits 16 to export"))
        elif "lowrank" in info:
            bad.append((name, f"its low-rank adapters have no {format} form; compress without --lowrank to export"))
        elif layout == "kquant":
            bad.append((name, f"its llama.cpp {info['gguf_type']} grid (--grid gguf:{info['gguf_type']}) has no {format} "
                              "scheme; export it with --format gguf, or compress without --grid to export"))
        elif layout != "affine":
            bad.append((name, f"its {layout} layout (per-cell or per-column widths) has no {format} scheme; "
                              "compress with --method gptq or rtn to export"))
        elif format == "compressed-tensors" and not 1 <= bits <= 8:
            bad.append((name, f"{bits}-bit codes (compressed-tensors packs 1..8 bits)"))
        elif format == "gptq" and bits not in GPTQ_BITS:
            bad.append((name, f"{bits}-bit codes (the GPTQ format packs {', '.join(map(str, GPTQ_BITS))} bits)"))
        elif format == "compressed-tensors" and g != -1 and in_f % g:
            bad.append((name, f"its {in_f} input columns are not a multiple of group {g} (compressed-tensors "
                              f"needs whole groups); compress with a group size that divides every row, e.g. "
                              f"--group-size {_dividing_group(quantized, g)}"))
        elif format == "gptq" and (in_f % 32 or out_f % 32):
            bad.append((name, f"its shape {out_f}x{in_f} (the GPTQ format packs 32 codes at a time along both "
                              "dimensions)"))
        else:
            out[name] = Scheme(bits, g, bool(info["symmetric"]))
    if bad:
        more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
        raise RdquantError(f"cannot export layer {bad[0][0]} to {format}: {bad[0][1]}{more}")
    return out


# vLLM cannot be installed here: these rules were read from its source (compressed_tensors_wNa16.py and the
# mixed-precision kernels' can_implement, vLLM 0.11.0 and 0.34.0; docs/notes/2026-12-05-export-kquants.md)
VLLM_GROUPS = (-1, 32, 64, 128)  # Marlin's group sizes
VLLM_FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def vllm_check(quantized: dict[str, dict[str, Any]], schemes: dict[str, Scheme]) -> str:
    """Whether vLLM's compressed-tensors weight-only path (CompressedTensorsWNA16, Marlin on the GPU) takes a
    compressed-tensors export: "yes", "0.34 and later only: WHY" or "no: WHY" (first reason, with a count)."""
    hard, newer = [], []
    for name, sc in schemes.items():
        out_f, in_f = quantized[name]["shape"]
        if sc.bits not in (4, 8):
            newer.append(f"{name} has {sc.bits}-bit codes: vLLM's Marlin / Machete kernels take 4 and 8 bits (0.34's "
                         "humming kernel accepts others, untested)")
        elif not sc.symmetric and sc.bits == 8:
            newer.append(f"{name} is asymmetric 8-bit: only Machete (Hopper GPUs) takes 8-bit zero points")
        if sc.group_size not in VLLM_GROUPS:
            hard.append(f"{name} has groups of {sc.group_size}: vLLM's kernels take -1, 32, 64 or 128")
        elif out_f % 64 or in_f % 128:
            newer.append(f"{name} is {out_f}x{in_f}: vLLM before 0.34 needs Marlin's output rows % 64 and inputs % 128")
    for parts in VLLM_FUSED:  # vLLM fuses these into one layer with one scheme
        prefixes = {n.removesuffix(parts[0]) for n in schemes if n.endswith(parts[0])}
        for pre in prefixes:
            found = {schemes.get(pre + part) for part in parts}
            if len(found) > 1:
                module = parts[0].rpartition(".")[0]
                hard.append(f"{pre}{module}.{{{','.join(p.rpartition('.')[2] for p in parts)}}} differ in scheme, and vLLM "
                            "fuses them into one layer")
    if hard:
        return f"no: {hard[0]}" + (f" (and {len(hard) - 1} more)" if len(hard) > 1 else "")
    if newer:
        return f"0.34 and later only: {newer[0]}" + (f" (and {len(newer) - 1} more)" if len(newer) > 1 else "")
    return "yes"


def _dividing_group(quantized: dict[str, dict[str, Any]], g: int) -> int:
    """The largest power of two below g that divides every layer's row (a hint for the error)."""
    k = g // 2
    while k > 1 and any(info["shape"][1] % k for info in quantized.values()):
        k //= 2
    return max(k, 1)


def _quantization_config(schemes_of: dict[str, Scheme], ignore: list[str]) -> dict[str, Any]:
    """compressed-tensors' quantization_config: one config group per scheme; a single scheme targets
    every Linear except the ignored ones, several target their layers by name."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    schemes = sorted(set(schemes_of.values()), key=lambda s: (s.bits, s.group_size, s.symmetric))
    groups = {}
    for i, s in enumerate(schemes):
        args = QuantizationArgs(num_bits=s.bits, type="int", symmetric=s.symmetric,
                                strategy="channel" if s.group_size == -1 else "group",
                                group_size=None if s.group_size == -1 else s.group_size)
        targets = ["Linear"] if len(schemes) == 1 else [f"re:^{n.replace('.', '[.]')}$" for n, t in schemes_of.items() if t == s]
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=args)
    qc = QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                            ignore=ignore)
    return qc.to_dict() if hasattr(qc, "to_dict") else qc.model_dump()


def _signed(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes as the signed int8 values compressed-tensors' packer takes (less 2^(bits-1))."""
    return (t.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def _pack_layer(qw, scheme: Scheme) -> dict[str, torch.Tensor]:
    """One affine layer in pack-quantized tensors: signed codes (ours less 2^(bits-1)) packed into
    int32, scales, packed signed zero points (asymmetric), the weight's shape."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out = {"weight_packed": pack_to_int32(_signed(qw.codes, scheme.bits), scheme.bits),
           "weight_scale": qw.scales.to(torch.float16).contiguous(),
           "weight_shape": torch.tensor(list(qw.shape), dtype=torch.int64)}
    if not scheme.symmetric:
        zp = _signed(qw.zero_points(), scheme.bits)
        out["weight_zero_point"] = pack_to_int32(zp, scheme.bits, packed_dim=0).contiguous()
    return out


GPTQ_BITS = (2, 3, 4, 8)


def _pack_gptq(qw, scheme: Scheme) -> tuple[dict[str, torch.Tensor], bool]:
    """One affine layer in the GPTQ format: codes as a dense LSB-first bit stream of 32 codes per `bits`
    int32 words along the input (qweight [in * bits / 32, out]), zero points likewise along the output
    (qzeros [n_groups, out * bits / 32]; stored less one, the format's v1 convention, unless `v2`),
    scales [n_groups, out], g_idx [in] (each input column's group). Returns (tensors, needs_v2): a zero
    point of 0 cannot be stored less one."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out_f, in_f = qw.shape
    G = in_f if scheme.group_size == -1 else scheme.group_size
    z = qw.zero_points().to(torch.int16)  # [out, n_groups]
    needs_v2 = bool((z == 0).any())
    stored_z = z if needs_v2 else z - 1
    return {"qweight": pack_to_int32(_signed(qw.codes, scheme.bits), scheme.bits).t().contiguous(),
            "qzeros": pack_to_int32(_signed(stored_z.t().contiguous(), scheme.bits), scheme.bits).contiguous(),
            "scales": qw.scales.to(torch.float16).t().contiguous(),
            "g_idx": (torch.arange(in_f) // G).to(torch.int32)}, needs_v2


def _gptq_config(schemes_of: dict[str, Scheme], v2: bool) -> dict[str, Any]:
    """quantize_config.json / config.json's quantization_config; differing widths or groups per layer go
    in `dynamic` (GPTQModel's per-module overrides, by module-name regex)."""
    common = max(set(schemes_of.values()), key=lambda s: sum(t == s for t in schemes_of.values()))
    cfg = {"quant_method": "gptq", "bits": common.bits, "group_size": common.group_size, "desc_act": False,
           "sym": common.symmetric, "true_sequential": True, "checkpoint_format": "gptq_v2" if v2 else "gptq",
           "pack_dtype": "int32"}
    other = {n: s for n, s in schemes_of.items() if s != common}
    if other:
        cfg["dynamic"] = {f"+:^{n.replace('.', '[.]')}$": {"bits": s.bits, "group_size": s.group_size, "sym": s.symmetric}
                          for n, s in other.items()}
    return cfg


def export(artifact: str | os.PathLike, out: str | os.PathLike, format: str = "compressed-tensors",
           overwrite: bool = False, progress: bool = True) -> Path:
    """Write `artifact` as a `format` model directory at `out` (config, weights, tokenizer); returns out."""
    from tqdm.auto import tqdm

    from .artifact import is_artifact, read_manifest

    if format not in FORMATS:
        raise RdquantError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    src = Path(artifact)
    if not is_artifact(src):
        raise RdquantError(f"{src} is not an rdquant artifact (no manifest.json): export takes what `rdquant compress` wrote")
    manifest = read_manifest(src)
    check_kv(manifest, format)
    if format == "gguf":
        return _export_gguf(src, manifest, Path(out), overwrite)
    try:
        import compressed_tensors  # noqa: F401  (its packer serves both formats)
    except ImportError as e:
        raise RdquantError(f"exporting {format} needs the compressed-tensors package: "
                           "pip install 'rdquant[export]'") from e
    schemes = plan(manifest["quantized"], format)  # refuse before reading any weight
    out = Path(out)
    safety.check_output(out, overwrite)

    from .loading import load, load_tokenizer
    from .runtime import QuantLinear

    model = load(src, backend="reference", lazy=True, dtype=_dense_dtype(manifest))
    state: dict[str, torch.Tensor] = {}
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    v2 = False
    for n, m in tqdm(quantized.items(), desc="export", unit="layer", disable=not progress):
        if format == "gptq":
            tensors, needs_v2 = _pack_gptq(m.quantized_weight(), schemes[n])
            v2 |= needs_v2
        else:
            tensors = _pack_layer(m.quantized_weight(), schemes[n])
        for k, v in tensors.items():
            state[f"{n}.{k}"] = v
        if m.bias is not None:
            state[f"{n}.bias"] = m.bias.detach()
        m._buffers.clear()  # the packed tensors are copied: free the layer
    seen: set[int] = set()
    for k, v in model.state_dict(keep_vars=False).items():
        owner = k.rpartition(".")[0]
        if owner in quantized or v.data_ptr() in seen or k.endswith(".kv_shift_k"):  # tied weights once; the
            continue  # KV cache's key shifts (zero without --kv-shift) have no place in the format
        seen.add(v.data_ptr())
        state[k] = v.detach().contiguous()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]
    config = model.config.to_dict()
    config["quantization_config"] = (_quantization_config(schemes, linears) if format == "compressed-tensors"
                                     else _gptq_config(schemes, v2))
    config.pop("torch_dtype", None)
    config["dtype"] = str(_dense_dtype(manifest)).removeprefix("torch.")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        safety.remove_owned(tmp)
    tmp.mkdir(parents=True)
    (tmp / safety.EXPORT_MARKER).write_text(json.dumps({"producer": "rdquant", "format": format, "source": str(src)}))
    from safetensors.torch import save_file

    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if format == "gptq":
        (tmp / "quantize_config.json").write_text(json.dumps(config["quantization_config"], indent=2))
    load_tokenizer(src).save_pretrained(tmp)
    if out.exists():
        safety.remove_owned(out)
    os.replace(tmp, out)
    return out


def _dense_dtype(manifest: dict[str, Any]) -> torch.dtype:
    return getattr(torch, manifest.get("dense_dtype", "float16"))


def check_before_compress(format: str, model, cfg) -> None:
    """Refuse, before any calibration, a compression whose result `format` could not hold: the layers
    the run would write, described as their manifest entries will be."""
    from .models import block_linears, find_blocks

    if format not in FORMATS:
        raise RdquantError(f"--export {format!r}: choose one of {', '.join(FORMATS)}")
    layout = {"claq": "codebook", "cvxq": "mixed", "slim": "sparse24" if cfg.slim_pattern == "2:4" else "sparse50"
              }.get(cfg.method, "affine")
    prefix, blocks = find_blocks(model)
    entries = {f"{prefix}.{i}.{n}": _planned_entry(cfg, tuple(lin.weight.shape)) or
               {"layout": layout, "bits": cfg.bits, "group_size": cfg.group_size, "symmetric": cfg.symmetric,
                "shape": list(lin.weight.shape)}
               for i, block in enumerate(blocks) for n, lin in block_linears(block).items()}
    from .vocab import vocab_entries

    entries.update(vocab_entries(model, cfg))
    if format == "gguf":
        from . import export_gguf

        export_gguf.check({"quantized": entries}, model.config.to_dict())
    else:
        plan(entries, format)


def _planned_entry(cfg, shape: tuple[int, int]) -> dict | None:
    """The manifest entry a `--grid gguf...` or `--cells layer` run will write for a linear of `shape` [out, in]
    (the k-quant layout, or an affine one), for checks made before calibration; None for other runs."""
    from .kquant import QK, TYPES, fallback_config, grid_type, ktype

    if cfg.method == "cvxq" and cfg.cvxq_cells == "layer":  # one affine width per linear (the widest stands in)
        return {"layout": "affine", "bits": cfg.cvxq_max_bits, "group_size": cfg.group_size, "symmetric": cfg.symmetric,
                "shape": list(shape)}
    if cfg.method == "cvxq" and cfg.grid == "gguf":  # a mix: every layer in some GGUF type (the narrowest stands in)
        from .methods.layermix import menu, type_config

        types = menu(shape[1], cfg)
        if not types:
            return None
        if types[0] in TYPES:
            return _planned_entry(type_config(cfg, types[0]), shape)
        return {"layout": "affine", "bits": 4, "group_size": 32, "symmetric": True, "shape": list(shape)}
    if cfg.method not in ("gptq", "rtn") or cfg.grid == "affine":
        return None
    if shape[1] % QK == 0:
        kt = ktype(grid_type(cfg.grid))
        return {"layout": "kquant", "gguf_type": kt.name, "bits": kt.bits, "group_size": kt.sub,
                "symmetric": not kt.has_min, "shape": list(shape)}
    fb = fallback_config(cfg)
    return {"layout": "affine", "bits": fb.bits, "group_size": fb.group_size, "symmetric": fb.symmetric, "shape": list(shape)}


def export_path(artifact: Path, format: str) -> Path:
    """Where `compress --export` writes: beside the artifact (w4 -> w4.gguf, w4-compressed-tensors)."""
    return artifact.with_name(artifact.name + (".gguf" if format == "gguf" else f"-{format}"))


def _export_gguf(src: Path, manifest: dict[str, Any], out: Path, overwrite: bool) -> Path:
    """One .gguf file at `out`; replaced only with `overwrite` and only if rdquant wrote it."""
    from . import export_gguf
    from .loading import load, load_tokenizer

    if out.suffix != ".gguf":
        raise RdquantError(f"--out {out}: a GGUF export is one file; give a path ending in .gguf")
    types = export_gguf.check(manifest, json.loads((src / "config.json").read_text()))  # before any weight
    if out.exists() or out.is_symlink():
        if not (overwrite and _written_by_rdquant(out)):
            raise RdquantError(f"--out {out} exists; " + ("pass --overwrite to replace it" if _written_by_rdquant(out)
                               else "rdquant did not write it and will not replace it; choose another --out"))
    safety.check_writable_parent(out)
    model = load(src, backend="reference", lazy=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        export_gguf.write(model, manifest, types, load_tokenizer(src), tmp, _source_gguf(manifest))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _written_by_rdquant(path: Path) -> bool:
    import gguf

    try:
        f = gguf.GGUFReader(str(path)).fields.get("general.quantized_by")
        return f is not None and f.contents() == "rdquant"
    except Exception:  # noqa: BLE001 - not a GGUF file: not ours
        return False


def _source_gguf(manifest: dict[str, Any]) -> Path | None:
    """The GGUF the artifact was made from (its tokenizer metadata is copied), if any."""
    from .models import ALIASES, alias_gguf

    src = str(manifest.get("source_model", ""))
    if src in ALIASES:
        return alias_gguf(src)
    p = Path(src)
    if p.is_file() and p.suffix == ".gguf":
        return p
    ggufs = sorted(p.glob("*.gguf")) if p.is_dir() and not (p / "config.json").is_file() else []
    return ggufs[0] if len(ggufs) == 1 else None
