"""The `rdquant` command: a thin layer over the Python API."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml

from .errors import RdquantError

CVXQ_GROUP = 128  # --group-size of cvxq when not given

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, help="Compress, inspect, evaluate and run LLMs.")


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def friendly(fn):
    """Turn expected failures into one-line messages instead of tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        try:
            return fn(*args, **kwargs)
        except RdquantError as e:
            _fail(str(e))
        except torch.OutOfMemoryError:
            _fail("out of memory on the device: try fewer --calib-samples, a smaller --batch-size, "
                  "a shorter --calib-seqlen, or --device cpu", 3)
        except MemoryError:
            _fail("out of host memory: try fewer --calib-samples or a shorter --calib-seqlen", 3)

    return wrapper


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | None) -> int | None:
    """'40MB' (SI), '38.5MiB' (binary) or a plain byte count -> bytes."""
    if text is None:
        return None
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise RdquantError(f"cannot read the size {text!r}: use e.g. 40MB, 38.5MiB, 1.2GB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@app.command()
@friendly
def compress(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="HF directory, .gguf file or alias"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to write"),
    method: Optional[str] = typer.Option(None, help="gptq | rtn | ecsq | claq | cvxq  [default: gptq]"),
    bits: Optional[int] = typer.Option(None, help="2..8  [default: 4]; ecsq: alphabet width (auto)"),
    target_coded_bits: Optional[float] = typer.Option(None, "--target-coded-bits",
                                                      help="ecsq: coded bits per weight, all-in"),
    target_bits: Optional[float] = typer.Option(None, "--target-bits",
                                                help="claq: all-in bits per weight of every layer, e.g. 3.1; "
                                                     "cvxq: of all quantized layers together"),
    target_size: Optional[str] = typer.Option(None, "--target-size",
                                              help="cvxq: bytes of the quantized layers, all-in, e.g. 40MB, 38.5MiB"),
    target_size_total: Optional[str] = typer.Option(None, "--target-size-total",
                                                    help="cvxq: bytes of the whole tensor file, 16-bit rest included"),
    solver: Optional[str] = typer.Option(None, "--solver", help="cvxq: gptq | rtn | claq  [default: gptq]"),
    sensitivity: Optional[str] = typer.Option(None, "--sensitivity",
                                              help="cvxq: gradient (CVXQ, PCA-projected output) | fisher | hessian (E[x^2] proxy)  [default: gradient]"),
    max_bits: Optional[int] = typer.Option(None, "--max-bits", help="cvxq: widest cell, 1..8  [default: 7]"),
    cells: Optional[str] = typer.Option(None, "--cells",
                                        help="cvxq with gptq/rtn: cluster (--group-size rows clustered by sensitivity x one "
                                             "column, CVXQ's cells) | group (one row x --group-size columns)  [default: cluster]"),
    grid: Optional[str] = typer.Option(None, "--grid", help="cvxq cluster cells: uniform (scale + zero point) | "
                                                             "laplace (CVXQ's companded grid, scale only)  [default: uniform]"),
    rate: Optional[str] = typer.Option(None, "--rate",
                                       help="cvxq with gptq/rtn: what the target counts: stored (packed bits) | coded (each cell's codes at "
                                            "their entropy under one table per width: the size after --codec auto)  [default: stored]"),
    bias_correction: Optional[bool] = typer.Option(None, "--bias-correction/--no-bias-correction",
                                                   help="store (W - Q) E[x] as a bias per layer  [default: off]"),
    outlier_frac: Optional[float] = typer.Option(None, "--outlier-frac",
                                                 help="claq: share of weights kept in fp16, e.g. 0.002  [default: 0]"),
    codebook_share: Optional[int] = typer.Option(None, "--codebook-share",
                                                 help="claq: columns per codebook  [default: 1]"),
    column_policy: Optional[str] = typer.Option(None, "--column-policy",
                                                help="claq, with --target-bits: rd (water-filling) | outlier (CLAQ's rule)  [default: rd]"),
    high_bits: Optional[int] = typer.Option(None, "--high-bits", help="claq: width of promoted columns, 0 = the low width + 1  [default: 0]"),
    row_scale: Optional[bool] = typer.Option(None, "--row-scale/--no-row-scale",
                                             help="claq: fp16 row scales, codebooks on row-normalised values  [default: on]"),
    entropy_lambda: Optional[float] = typer.Option(None, "--entropy-lambda",
                                                   help="claq: entropy-constrained codes, rate weighed against distortion (0.7: ~2% smaller coded "
                                                        "file, ~3% more layer error); 0 = nearest-centroid codes  [default: 0]"),
    tune_steps: Optional[int] = typer.Option(None, "--tune-steps",
                                             help="distillation tuning of codebook values / scales after the solver (codes and size unchanged), Adam steps  [default: 0 = off]"),
    tune_lr: Optional[float] = typer.Option(None, "--tune-lr", help="tuning step, relative to each tensor's magnitude  [default: 1e-3]"),
    group_size: Optional[int] = typer.Option(None, "--group-size", "-g",
                                             help="-1 = per row; cvxq cluster cells: rows per cluster  [default: 64; cvxq: 128]"),
    symmetric: Optional[bool] = typer.Option(None, "--symmetric/--asymmetric", help="[default: asymmetric]"),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order", help="[default: on]"),
    damp_percent: Optional[float] = typer.Option(None, "--damp", help="GPTQ damping  [default: 0.01]"),
    clip_search: Optional[int] = typer.Option(None, "--clip-search", help="grid shrink steps, 0 = min-max  [default: 20]"),
    scale_bits: Optional[int] = typer.Option(None, "--scale-bits",
                                             help="mantissa bits kept in the fp16 group scales (1-10); fewer compress under --codec, error <= 2^-(bits+1)  [default: 10]"),
    calib: Optional[str] = typer.Option(None, help="text or JSONL file  [default: bundled C4 sample]"),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="[default: 128]"),
    calib_seqlen: Optional[int] = typer.Option(None, "--calib-seqlen", help="[default: 512]"),
    seed: Optional[int] = typer.Option(None, help="[default: 0]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="windows per forward  [default: 16]"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | cuda:N  [default: cpu]"),
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe; flags given here override it"),
    resume: bool = typer.Option(False, help="continue an interrupted run from its last finished block"),
    overwrite: bool = typer.Option(False, help="replace --out if it exists"),
    codec: str = typer.Option("none", help="entropy coding of the quantized tensors: none | zstd-L | lz4 | ans | auto"),
    speed_floor: float = typer.Option(200.0, "--codec-speed-floor", help="auto: slowest decode allowed, MB/s"),
    eval_: bool = typer.Option(False, "--eval", help="also print WikiText-2 perplexity, original vs compressed"),
    eval_windows: int = typer.Option(8, "--eval-windows", help="windows for --eval"),
    eval_seqlen: int = typer.Option(2048, "--eval-seqlen"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Quantize a model's linear layers and write a packed artifact."""
    from . import compress as api_compress
    from .config import CompressConfig
    from .evaluate import evaluate
    from .models import load_model
    from .report import inspect as api_inspect

    given = dict(method=method, bits=bits, target_coded_bits=target_coded_bits, target_bits=target_bits,
                 target_size=parse_size(target_size), target_size_total=parse_size(target_size_total),
                 cvxq_solver=solver, cvxq_sensitivity=sensitivity, cvxq_max_bits=max_bits, cvxq_cells=cells, cvxq_grid=grid,
                 cvxq_rate=rate, bias_correction=bias_correction,
                 claq_outlier_frac=outlier_frac, claq_share=codebook_share, claq_high_bits=high_bits,
                 claq_policy=column_policy, tune_steps=tune_steps, tune_lr=tune_lr,
                 claq_row_scale=row_scale, claq_entropy_lambda=entropy_lambda, group_size=group_size, symmetric=symmetric, act_order=act_order,
                 damp_percent=damp_percent, clip_search=clip_search, scale_bits=scale_bits, calib=calib, calib_samples=calib_samples,
                 calib_seqlen=calib_seqlen, seed=seed, batch_size=batch_size, device=device)
    base = CompressConfig.from_yaml(recipe) if recipe else CompressConfig()
    cfg = base.replace(**{k: v for k, v in given.items() if v is not None})
    if cfg.method == "cvxq" and group_size is None and not (recipe and "group_size" in (yaml.safe_load(recipe.read_text()) or {})):
        cfg = cfg.replace(group_size=CVXQ_GROUP)  # measured best for CVXQ's cells (BENCHMARKS.md section 6)
    if out.exists() and not overwrite:
        raise RdquantError(f"{out} already exists; pass --overwrite to replace it")
    ckpt = out.with_name(out.name + ".partial")
    if resume and not ckpt.is_dir():
        raise RdquantError(f"--resume: no checkpoint at {ckpt}")
    m, tok, model_id = load_model(model)
    original = None
    if eval_:
        original = evaluate(m, tok, seqlen=eval_seqlen, max_windows=eval_windows, device=cfg.device, progress=progress)
    try:
        cm = api_compress(m, cfg, tokenizer=tok, checkpoint_dir=ckpt, resume=resume, progress=progress, model_id=model_id)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: finished blocks are kept in {ckpt}; rerun with --resume", err=True)
        raise typer.Exit(130)
    cm.save(out, overwrite=overwrite, codec=codec, speed_floor_mbps=speed_floor)
    import shutil

    shutil.rmtree(ckpt, ignore_errors=True)
    rep = api_inspect(out)
    typer.echo(f"wrote {out} in {cm.seconds:.1f} s compress time")
    typer.echo(rep.table(per_layer=False))
    if original is not None:
        q = evaluate(cm, seqlen=eval_seqlen, max_windows=eval_windows, device=cfg.device, progress=progress)
        typer.echo(f"\nWikiText-2 perplexity ({q.windows} windows x {q.seqlen} = {q.tokens} tokens)")
        typer.echo(f"  original (16-bit: {rep.original_16bit_bytes / 2**20:7.1f} MiB)  ppl {original.ppl:8.3f}")
        typer.echo(f"  rdquant  ({rep.total_bytes / 2**20:7.1f} MiB, {rep.bits_per_weight:.3f} bpw)  ppl {q.ppl:8.3f}")


@app.command("eval")
@friendly
def eval_cmd(
    model: str = typer.Argument(..., help="artifact directory, HF directory, .gguf file or alias"),
    data: str = typer.Option("wikitext2", help="wikitext2 or a text/JSONL file"),
    seqlen: int = typer.Option(2048),
    max_windows: Optional[int] = typer.Option(None, "--max-windows"),
    device: str = typer.Option("cpu"),
    as_json: bool = typer.Option(False, "--json"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Perplexity with the standard protocol (non-overlapping windows, exp of mean NLL)."""
    from dataclasses import asdict

    from .evaluate import evaluate

    r = evaluate(model, data=data, seqlen=seqlen, max_windows=max_windows, device=device, progress=progress)
    if as_json:
        typer.echo(json.dumps(asdict(r)))
    else:
        typer.echo(f"{model}: ppl {r.ppl:.4f} on {data} ({r.windows} windows x {r.seqlen} = {r.tokens} tokens, {r.seconds:.1f} s)")


@app.command("inspect")
@friendly
def inspect_cmd(
    artifact: Path = typer.Argument(...),
    layers: bool = typer.Option(True, "--layers/--no-layers"),
    as_json: bool = typer.Option(False, "--json"),
    decode_speed: bool = typer.Option(True, "--decode-speed/--no-decode-speed",
                                      help="coded artifacts: decode every coded qweight once and report codes/s"),
) -> None:
    """Per-layer table and totals: params, all-in bits/weight, bytes on disk, compression ratio; for coded
    artifacts also the codes' entropy, codec, mapping and measured decode speed."""
    from .report import inspect as api_inspect

    rep = api_inspect(artifact, decode_speed=decode_speed)
    if as_json:
        typer.echo(json.dumps({"bits_per_weight": rep.bits_per_weight, "total_bytes": rep.total_bytes,
                               "quantized_params": rep.quantized_params, "quantized_bytes": rep.quantized_bytes,
                               "dense_bytes": rep.dense_bytes, "compression_ratio": rep.compression_ratio,
                               "split_bits_per_weight": rep.split_bits(),
                               "coded_bits_per_weight": rep.coded_bits_per_weight,
                               "decode_mcodes_per_s": rep.decode_mcodes}))
    else:
        typer.echo(rep.table(per_layer=layers))


@app.command()
@friendly
def recode(
    artifact: Path = typer.Argument(..., help="artifact directory to re-code"),
    out: Path = typer.Option(..., "--out", "-o"),
    codec: str = typer.Option("auto", help="none | zstd-L | lz4 | ans | auto"),
    speed_floor: float = typer.Option(200.0, "--codec-speed-floor", help="auto: slowest decode allowed, MB/s"),
    dense: bool = typer.Option(False, help="also code the tensors left in 16 bit"),
    overwrite: bool = typer.Option(False),
) -> None:
    """Copy an artifact with its tensors entropy-coded (or decoded, with --codec none); the model is
    bit-identical."""
    from .coding import recode as api_recode
    from .report import inspect as api_inspect

    api_recode(artifact, out, codec=codec, speed_floor_mbps=speed_floor, dense=dense, overwrite=overwrite)
    typer.echo(api_inspect(out).table(per_layer=False))


@app.command()
@friendly
def generate(
    model: str = typer.Argument(..., help="artifact directory, HF directory, .gguf file or alias"),
    prompt: str = typer.Option("The capital of France is", "--prompt", "-p"),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens"),
    chat: bool = typer.Option(False, help="wrap the prompt in the tokenizer's chat template"),
    device: str = typer.Option("cpu"),
) -> None:
    """Greedy generation from a prompt."""
    import torch

    from .evaluate import load_any

    m, tok = load_any(model, device=device)
    text = prompt
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt").to(device)
    with torch.inference_mode():
        out = m.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    typer.echo(tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
