"""`inspect(dir)`: per-layer and total size accounting of an artifact, all side information included."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifact import check_sidecars, entry_nbytes, read_manifest, stored_nbytes
from .errors import ArtifactError, RdquantError, first_line
from .backends import KERNELS
from .layouts import LayerSpec, layout_named
from .runtime import QUANT_BUFFERS

# where each stored tensor's bytes go in the bits-per-weight split
PART_OF = {"qweight": "codes", "codebook": "codebooks", "codebook_range": "codebooks", "outlier_count": "outliers", "outlier_row": "outliers",
           "outlier_val": "outliers", "scales": "other", "qzeros": "other", "widths": "other", "qwidths": "other", "qclusters": "other",
           "row_scale": "other", "bias": "other", "meta": "sparsity", "bitmask": "sparsity", "lowrank_down": "adapters",
           "lowrank_down_scales": "adapters", "lowrank_up": "adapters", "lowrank_up_scales": "adapters"}
PARTS = ("codes", "codebooks", "outliers", "sparsity", "adapters", "other")


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    method: str
    bits: int
    group_size: int
    params: int
    bytes: int  # codes + scales + zero points (+ bias), bit-packed
    stored_bytes: int = 0  # the same tensors as stored (after any codec)
    codec: str = "none"  # of qweight
    entropy_bits: float | None = None  # empirical entropy of the coded symbols, bits per weight
    split: dict[str, int] = field(default_factory=dict)  # bytes by PARTS
    mean_width: float | None = None  # codebook layout: mean code width over columns
    mapping: str = "-"  # how qweight's codes became symbols or streams (coding.py), if coded
    decode_mcodes: float | None = None  # measured decode speed of qweight, millions of codes/s, one thread
    kernel: str = "-"  # the GPU kernel backend `auto` picks for the layer on CUDA ('-': cached or reference)
    cpu_kernel: str = "-"  # the CPU kernel `auto` falls back to where `cached` does not fit ('-': reference)
    kind: str = "linear"  # linear (a decoder-block linear) | embedding | head

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.params

    @property
    def coded_bits_per_weight(self) -> float:
        return 8 * self.stored_bytes / self.params


@dataclass
class InspectReport:
    path: str
    source_model: str
    layers: list[LayerReport] = field(default_factory=list)
    quantized_params: int = 0
    quantized_bytes: int = 0
    quantized_stored_bytes: int = 0
    vocab_params: int = 0  # quantized token embedding and output head (a tied pair once)
    vocab_bytes: int = 0
    dense_params: int = 0
    dense_bytes: int = 0
    total_bytes: int = 0  # every file in the artifact directory
    tensor_bytes: int = 0  # the tensor files (*.safetensors): every tensor, no tokenizer or manifest
    original_16bit_bytes: int = 0  # all parameters (tied ones once) at 2 bytes each
    decode_mcodes: float | None = None  # all coded qweights, millions of codes/s, one thread (when measured)
    verified: int | None = None  # tensors whose sha256 was checked (None: not checked)
    exports: dict[str, str] = field(default_factory=dict)  # format -> "yes" or why `rdquant export` refuses it
    kv_cache: dict | None = None  # the quantized KV cache's spec (manifest `kv_cache`), if any
    kv_bytes_per_token: float | None = None  # its bytes per token, all layers, K and V, at long context
    kv_fp16_bytes_per_token: float | None = None
    memory: Any = None  # stream.Plan sizes at the default dtype (float32): whole model, smallest --max-memory

    @property
    def bits_per_weight(self) -> float:
        """All-in bits per quantized weight: codes, scales, zero points and biases."""
        return 8 * self.quantized_bytes / max(self.quantized_params, 1)

    @property
    def coded_bits_per_weight(self) -> float:
        """All-in bits per quantized weight as stored (after entropy coding, if any)."""
        return 8 * self.quantized_stored_bytes / max(self.quantized_params, 1)

    def split_bits(self) -> dict[str, float]:
        """All-in bits per quantized weight by part: codes, codebooks, outliers, other side info."""
        n = max(self.quantized_params, 1)
        return {k: 8 * sum(l.split.get(k, 0) for l in self.layers if l.kind == "linear") / n for k in PARTS}

    def kernel_summary(self, cpu: bool = False) -> str:
        """Which backend `auto` gives the layers on a CUDA device (cpu: where `cached` does not fit on the
        CPU), with counts."""
        counts: dict[str, int] = {}
        for l in self.layers:
            k = l.cpu_kernel if cpu else l.kernel
            k = k if k != "-" else ("reference" if cpu else "cached/reference")
            counts[k] = counts.get(k, 0) + 1
        return ", ".join(f"{k} ({v} layers)" for k, v in counts.items()) or "no quantized layers"

    @property
    def compression_ratio(self) -> float:
        return self.original_16bit_bytes / max(self.total_bytes, 1)

    @property
    def file_bits_per_param(self) -> float:
        """Whole-file bits per parameter: every byte on disk over every parameter of the model (llama.cpp's
        basis: embeddings, head and norms count), beside the per-linear-weight figure."""
        return 16 * self.total_bytes / max(self.original_16bit_bytes, 1)

    @property
    def tensor_bits_per_param(self) -> float:
        """Every tensor (the safetensors files) over every parameter: the size basis of
        --target-size-total, without the tokenizer and manifest files."""
        return 16 * self.tensor_bytes / max(self.original_16bit_bytes, 1)

    def table(self, per_layer: bool = True) -> str:
        lines = []
        if per_layer:
            lines.append(
                f"{'layer':<44} {'shape':>10} {'method':>6} {'bits':>5} {'group':>5} {'bytes':>10} {'bpw':>6}"
                f" {'codes':>6} {'books':>6} {'outl':>6} {'mask':>6} {'adapt':>6} {'other':>6} {'codec':>8} {'mapping':>19} {'H(code)':>7}"
                f" {'coded bpw':>9} {'decode M/s':>10} {'GPU kernel':>10}"
            )
            for l in self.layers:
                shape = f"{l.shape[0]}x{l.shape[1]}"
                h = "-" if l.entropy_bits is None else f"{l.entropy_bits:.3f}"
                bits = f"{l.mean_width:.2f}" if l.mean_width is not None else str(l.bits)
                sp = " ".join(f"{8 * l.split.get(k, 0) / l.params:>6.3f}" for k in PARTS)
                lines.append(
                    f"{l.name:<44} {shape:>10} {l.method:>6} {bits:>5} {l.group_size:>5} {l.bytes:>10,} "
                    f"{l.bits_per_weight:>6.3f} {sp} {l.codec:>8} {l.mapping:>19} {h:>7} {l.coded_bits_per_weight:>9.3f}"
                    f" {'-' if l.decode_mcodes is None else format(l.decode_mcodes, '.0f'):>10} {l.kernel:>10}"
                )
            lines.append("")
        lines += [
            f"artifact            {self.path}  (from {self.source_model})",
            f"quantized linears   {self.quantized_params:,} params in {sum(l.kind == 'linear' for l in self.layers)} layers, "
            f"{self.quantized_bytes:,} bytes, {self.bits_per_weight:.3f} bits/weight all-in",
            "  of which          " + ", ".join(f"{k} {v:.3f}" for k, v in self.split_bits().items()),
            f"  as stored         {self.quantized_stored_bytes:,} bytes, {self.coded_bits_per_weight:.3f} bits/weight all-in"
            f" ({100 * (1 - self.quantized_stored_bytes / max(self.quantized_bytes, 1)):.1f}% saved by coding)"
            + ("" if self.decode_mcodes is None else f"; codes decode at {self.decode_mcodes:,.0f} M/s (one thread)"),
            *([f"embedding / head    {self.vocab_params:,} params, {self.vocab_bytes:,} bytes, "
               f"{8 * self.vocab_bytes / self.vocab_params:.3f} bits/weight all-in (quantized; "
               + ", ".join(f"{l.name} " + (f"{l.mean_width:.2f}-bit mean (allocated widths)" if l.mean_width is not None
                                           else f"{l.bits}-bit") for l in self.layers if l.kind != "linear") + ")"]
              if self.vocab_params else []),
            f"left in 16 bit      {self.dense_params:,} params, {self.dense_bytes:,} bytes",
            f"on disk             {self.total_bytes:,} bytes ({self.total_bytes / 2**20:.1f} MiB)",
            f"16-bit original     {self.original_16bit_bytes:,} bytes; compression ratio {self.compression_ratio:.2f}x",
            f"whole file          {self.file_bits_per_param:.3f} bits per parameter (all tensors and files: llama.cpp's basis); "
            f"tensors alone {self.tensor_bits_per_param:.3f}",
            f"backends (auto)     GPU: {self.kernel_summary()}; CPU: cached where memory allows, "
            f"else {self.kernel_summary(cpu=True)}",
            f"checksums           all {self.verified} tensors and files read and verified (sha256)" if self.verified is not None
            else "checksums           not checked here (`rdquant inspect` verifies them)",
        ]
        if self.memory is not None:
            m, mib = self.memory, 2**20
            lines.append(f"memory (float32)    {m.total / mib:,.1f} MiB loaded; runs in as little as --max-memory "
                         f"{m.minimum / mib:,.1f} MiB ({m.fixed / mib:,.1f} MiB outside the {len(m.blocks)} decoder blocks, "
                         f"one block of {max(m.slots) / mib:,.2f} MiB streamed at a time)")
        if self.kv_cache is not None:
            kv = self.kv_cache
            keys = (f"keys per channel over {kv['key_tokens']} tokens" if kv["key_axis"] == "channel"
                    else "keys per token")
            lines.append(f"KV cache            {kv['bits']}-bit ({keys}, values per token), past-only: "
                         + (f"{self.kv_bytes_per_token:,.0f} bytes/token against {self.kv_fp16_bytes_per_token:,.0f} in "
                            f"16 bits ({self.kv_bytes_per_token / self.kv_fp16_bytes_per_token:.3f}x)"
                            if self.kv_bytes_per_token else "bytes/token unknown (no head counts in config.json)"))
        lines += [f"{'export' if i == 0 else '':<20}{fmt}: {why}" for i, (fmt, why) in enumerate(self.exports.items())]
        return "\n".join(lines)




def verify_tensors(path: Path, manifest: dict, batch_bytes: int = 256 * 2**20) -> int:
    """Read, decode and sha256-check every tensor of an artifact, and every coded payload as stored, a
    few layers at a time (never the whole model in memory); raises ArtifactError naming the first damaged
    tensor, as `load` does. Returns the number of tensors checked."""
    from .artifact import read_tensors

    layers: dict[str, list[str]] = {}
    for name in manifest["tensors"]:
        layers.setdefault(name.rpartition(".")[0], []).append(name)
    batch: list[str] = []
    size = 0
    for names in layers.values():
        batch += names
        size += sum(stored_nbytes(manifest["tensors"][n]) for n in names)
        if size >= batch_bytes:
            read_tensors(path, verify=True, names=batch, verify_payloads=True)
            batch, size = [], 0
    if batch:
        read_tensors(path, verify=True, names=batch, verify_payloads=True)
    return len(manifest["tensors"])


def inspect(path: str | os.PathLike, decode_speed: bool = False, verify: bool = True) -> InspectReport:
    """Size report of an artifact, from its manifest and files. With `verify` (default) every tensor is
    read, decoded and checked against its sha256 first (coded payloads against theirs too, and the
    config, tokenizer and log files): a damaged artifact raises ArtifactError, as `load` would. With `decode_speed` every coded qweight is decoded once more, on one thread, and timed."""
    p = Path(path)
    manifest = read_manifest(p)
    verified = verify_tensors(p, manifest) + check_sidecars(p, manifest) if verify else None
    try:
        return _report(p, manifest, verified, decode_speed)
    except RdquantError:
        raise
    except Exception as e:  # what read_manifest's checks do not cover: a damaged value the report reads
        raise ArtifactError(f"{p} could not be inspected ({type(e).__name__}: {first_line(e)}); the artifact is damaged "
                            "or was written by another version") from e


def _report(p: Path, manifest: dict, verified: int | None, decode_speed: bool) -> InspectReport:
    from .stream import make_plan

    tensors = manifest["tensors"]
    rep = InspectReport(str(p), str(manifest.get("source_model", "?")), verified=verified)
    try:
        rep.memory = make_plan(manifest, None)
    except RdquantError:  # nothing to stream (no quantized decoder blocks)
        rep.memory = None
    owned: set[str] = set()
    for name, info in manifest["quantized"].items():
        keys = [k for k in (f"{name}.{s}" for s in (*QUANT_BUFFERS, "bias")) if k in tensors]
        owned.update(keys)
        out_f, in_f = info["shape"]
        if f"{name}.qweight" not in tensors:  # every layout stores its codes as qweight
            raise ArtifactError(f"{p}/manifest.json is damaged: quantized layer {name} has no tensor {name}.qweight")
        qweight = tensors[f"{name}.qweight"]
        codec = qweight.get("codec", {})
        rep.layers.append(
            LayerReport(name, (out_f, in_f), info.get("method", "?"), info["bits"], info["group_size"], out_f * in_f,
                        sum(entry_nbytes(tensors[k]) for k in keys), sum(stored_nbytes(tensors[k]) for k in keys),
                        codec.get("codec", "none"), codec.get("entropy_bits"),
                        split={}, mean_width=info.get("mean_width"), mapping=codec.get("mapping", codec.get("kind", "-")))
        )
        layout = layout_named(info.get("layout", "affine"))
        spec = LayerSpec(out_f, in_f, info["bits"], info["group_size"], info["symmetric"], info)
        rep.layers[-1].kind = info.get("kind", "linear")
        rep.layers[-1].kernel = "triton" if layout.kernel_supports(spec, "triton") else "-"
        rep.layers[-1].cpu_kernel = next((k for k in KERNELS if k != "triton" and layout.kernel_supports(spec, k)), "-")
        for k in keys:
            part = PART_OF[k.rpartition(".")[2]]
            rep.layers[-1].split[part] = rep.layers[-1].split.get(part, 0) + entry_nbytes(tensors[k])
    linears = [l for l in rep.layers if l.kind == "linear"]  # the figure every bench table compares
    rep.quantized_params = sum(l.params for l in linears)
    rep.quantized_bytes = sum(l.bytes for l in linears)
    rep.quantized_stored_bytes = sum(l.stored_bytes for l in linears)
    rep.vocab_params = sum(l.params for l in rep.layers if l.kind != "linear")
    rep.vocab_bytes = sum(l.stored_bytes for l in rep.layers if l.kind != "linear")
    dense = [info for k, info in tensors.items() if k not in owned]
    rep.dense_params = sum(math.prod(i["shape"]) for i in dense)
    rep.dense_bytes = sum(stored_nbytes(i) for i in dense)
    rep.total_bytes = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    rep.tensor_bytes = sum(f.stat().st_size for f in p.glob("*.safetensors"))
    biases = sum(math.prod(tensors[k]["shape"]) for k in owned if k.endswith(".bias"))
    rep.original_16bit_bytes = 2 * (rep.quantized_params + rep.vocab_params + rep.dense_params + biases)
    if decode_speed:
        per_layer, rep.decode_mcodes = decode_speeds(p, manifest)
        for layer in rep.layers:
            layer.decode_mcodes = per_layer.get(layer.name)
    rep.exports = export_options(p, manifest)
    if isinstance(manifest.get("kv_cache"), dict):
        rep.kv_cache = manifest["kv_cache"]
        rep.kv_bytes_per_token, rep.kv_fp16_bytes_per_token = _kv_bytes(p, manifest["kv_cache"])
    return rep


def _kv_bytes(p: Path, kv: dict) -> tuple[float | None, float | None]:
    """(quantized, 16-bit) KV-cache bytes per token over all layers, from config.json's head counts."""
    from .kvcache import KVSpec

    try:
        cfg = json.loads((p / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        D = cfg.get("head_dim") or cfg["hidden_size"] // heads
        return layers * KVSpec(**kv).bytes_per_token(D, kv_heads), float(layers * kv_heads * D * 2 * 2)
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def export_options(p: Path, manifest: dict) -> dict[str, str]:
    """For each `rdquant export` format: "yes", or the reason it refuses this artifact (shapes and grids only)."""
    from . import export_gguf
    from .export import check_kv, plan, vllm_check

    out = {}
    for fmt in ("compressed-tensors", "gptq", "gguf"):
        try:
            check_kv(manifest, fmt)
            if fmt == "gguf":
                export_gguf.check(manifest, json.loads((p / "config.json").read_text()))
            else:
                schemes = plan(manifest["quantized"], fmt)
            out[fmt] = "yes" + (" (Q4_1 / Q5_1: if every block's offset is an fp16 value)"
                                if fmt == "gguf" and any(not i["symmetric"] for i in manifest["quantized"].values()) else "")
            if fmt == "compressed-tensors":
                out[fmt] += f"; vLLM (rules read from its source, not run): {vllm_check(manifest['quantized'], schemes)}"
        except RdquantError as e:
            out[fmt] = "no: " + str(e).split(": ", 1)[-1]
        except (OSError, ValueError):
            out[fmt] = "no: the artifact has no readable config.json"
    return out


def decode_speeds(path: Path, manifest: dict) -> tuple[dict[str, float], float | None]:
    """Millions of codes per second decoding each coded qweight (payload in memory -> packed qweight,
    the loader's whole decode path), one thread; and over all of them. Empty / None if none is coded."""
    import time

    import torch
    from safetensors import safe_open

    from .artifact import read_tensors
    from .coding import decode_tensor

    entries, quantized = manifest["tensors"], manifest["quantized"]
    layers = [n for n in quantized if "codec" in entries.get(f"{n}.qweight", {})]
    if not layers:
        return {}, None
    side = [k for n in layers for k in (f"{n}.{b}" for b in QUANT_BUFFERS if b != "qweight") if k in entries]
    _, decoded = read_tensors(path, names=side)  # zero points, widths: what a qweight's decoder needs
    payloads = {}
    for fname in {entries[f"{n}.qweight"]["file"] for n in layers}:  # each file opened once
        with safe_open(path / fname, framework="pt") as fh:
            payloads.update({f"{n}.qweight": fh.get_tensor(f"{n}.qweight") for n in layers
                             if entries[f"{n}.qweight"]["file"] == fname})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    speeds, total_s, total_codes = {}, 0.0, 0
    try:
        for k, n in enumerate([layers[0], *layers]):  # the first decode, untimed, warms up the codec
            name = f"{n}.qweight"
            t0 = time.perf_counter()
            decode_tensor(name, payloads[name], entries[name], quantized, decoded)
            dt = time.perf_counter() - t0
            if k == 0:
                continue
            codes = math.prod(quantized[n]["shape"])
            total_s, total_codes = total_s + dt, total_codes + codes
            speeds[n] = codes / max(dt, 1e-9) / 1e6
    finally:
        torch.set_num_threads(threads)
    return speeds, total_codes / max(total_s, 1e-9) / 1e6
