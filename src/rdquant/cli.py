"""The `rdquant` command: a thin layer over the Python API."""

from __future__ import annotations

import functools
import inspect
import json
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
import yaml

from . import __version__
from .coding import DEFAULT_SPEED_FLOOR_MBPS
from .config import FIELDS, _hints, flag_of
from .errors import RdquantError
from .models import DEFAULT_MODEL

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, help="Compress, inspect, evaluate and run LLMs.")


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def debugging() -> bool:
    """--debug (or RDQUANT_DEBUG=1): show tracebacks instead of one-line errors."""
    return os.environ.get("RDQUANT_DEBUG", "") not in ("", "0")


def friendly(fn):
    """Turn failures into one-line messages (cause and fix) instead of tracebacks; --debug shows them."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            if debugging():
                traceback.print_exc()
            if isinstance(e, RdquantError):
                _fail(str(e))
            if isinstance(e, torch.OutOfMemoryError):
                _fail("out of memory on the device: try fewer --calib-samples, a smaller --batch-size, "
                      "a shorter --calib-seqlen, or --device cpu", 3)
            if isinstance(e, MemoryError):
                _fail("out of host memory: try fewer --calib-samples or a shorter --calib-seqlen", 3)
            if isinstance(e, OSError):
                where = f" ({e.filename})" if e.filename else ""
                _fail(f"{e.strerror or e}{where}: check the path, its permissions and the free disk space", 3)
            _fail(f"internal error ({type(e).__name__}: {e}); rerun with --debug for the traceback and report it", 1)

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rdquant {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks instead of one-line errors (or RDQUANT_DEBUG=1)"),
) -> None:
    """Compress, inspect, evaluate and run LLMs."""
    if debug:
        os.environ["RDQUANT_DEBUG"] = "1"


def check_codec(codec: str) -> None:
    """Refuse an unknown --codec before any work."""
    from .codecs import CodecSpec

    if codec == "auto":
        return
    try:
        CodecSpec.parse(codec)
    except ValueError as e:
        raise RdquantError(f"--codec: {e}") from None


def _check_backend(backend: str) -> None:
    from .backends import BACKENDS

    if backend not in BACKENDS:
        raise RdquantError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def _positive(flag: str, value: int | None, lo: int = 1) -> None:
    if value is not None and value < lo:
        raise RdquantError(f"{flag} must be at least {lo} (got {value})")


def _shown_default(f) -> str | bool:
    return True if f.default is not None else "none"


def _config_parameters() -> list[inspect.Parameter]:
    """One typer option per CompressConfig field that has a flag: default, help and panel from the field."""
    params = []
    for name, f in FIELDS.items():
        m = f.metadata
        if not m["cli"]:
            continue
        flag = flag_of(name)
        hint = _hints()[name]
        decls = [flag] if hint is not bool else [f"{flag}/--no-{flag[2:]}"]
        if m["short"]:
            decls.append(m["short"])
        choices = [c for c in (m["choices"] or ()) if c not in m["experimental_values"]]
        help_text = m["help"] if not choices or "|" in m["help"] else f"{m['help']}: {' | '.join(map(str, choices))}"
        annotation = hint if m["unit"] not in ("size", "auto") else Optional[str]
        option = typer.Option(f.default, *decls, help=help_text, rich_help_panel=m["panel"], show_default=_shown_default(f))
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def _given_on_command_line(ctx: typer.Context, values: dict) -> dict:
    # by name: typer may bundle its own copy of click's ParameterSource enum
    return {k: v for k, v in values.items()
            if getattr(ctx.get_parameter_source(k), "name", None) in ("COMMANDLINE", "ENVIRONMENT")}


def _experimental(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RdquantError(f"--experimental {pair!r}: use KEY=VALUE, e.g. --experimental cvxq_cells=group")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def default_out(model: str, cfg) -> Path:
    """artifacts/<model>-<method>-<size>, or the first free -2, -3, ... beside it."""
    from .safety import fresh_path

    stem = Path(model.rstrip("/")).name.removesuffix(".gguf") or "model"
    if cfg.target_bits is not None:
        size = f"t{cfg.target_bits:g}"
    elif cfg.target_size is not None or cfg.target_size_total is not None:
        size = f"s{cfg.target_size or cfg.target_size_total}"
    else:
        size = f"w{cfg.bits}g{cfg.group_size}"
    return fresh_path(Path("artifacts") / f"{stem}-{cfg.method}-{size}")


def _run_compress(ctx: typer.Context, model: str, out: Optional[Path], recipe: Optional[Path], resume: bool,
                  overwrite: bool, codec: str, speed_floor: float, eval_: bool, eval_windows: int, eval_seqlen: int,
                  progress: bool, experimental: list[str], export_formats: list[str] | None = None,
                  **settings) -> None:
    """Quantize a model's linear layers and write a packed artifact."""
    from . import compress as api_compress
    from .config import check_device, from_settings, read_recipe
    from .data import eval_text, read_documents
    from .data import check_seqlen
    from .evaluate import evaluate
    from .models import load_model
    from .report import inspect as api_inspect
    from .safety import blocks_done, check_output, is_own_checkpoint, remove_owned

    # everything a user can get wrong is checked here, before the model is loaded
    given = _given_on_command_line(ctx, settings)  # size strings ('40MB') are read by from_settings
    base = read_recipe(recipe) if recipe else {}
    exp = {**(base.pop("experimental", None) or {}), **_experimental(experimental)}
    where = f"recipe {recipe} / command line" if recipe else "command line"
    cfg = from_settings(exp, given, base, where=where, flags=True)
    check_device(cfg.device)
    check_codec(codec)
    _positive("--eval-windows", eval_windows)
    _positive("--eval-seqlen", eval_seqlen, 2)
    if speed_floor <= 0:
        raise RdquantError("--codec-speed-floor must be a positive speed in MB/s")
    read_documents(cfg.calib)  # exists, UTF-8, has text
    if eval_:
        eval_text("wikitext2")
    out = out if out is not None else default_out(model, cfg)
    check_output(out, overwrite)
    ckpt = out.with_name(out.name + ".partial")
    if resume and not is_own_checkpoint(ckpt):
        raise RdquantError(f"--resume: no checkpoint of an interrupted run at {ckpt}")
    if ckpt.exists() and not resume:
        if not overwrite:
            raise RdquantError(f"an interrupted run left a checkpoint in {ckpt}: add --resume to continue it, "
                               "or --overwrite to discard it")
        check_output(ckpt, overwrite=True, flag="checkpoint")
    from .export import FORMATS, check_before_compress, export_path

    for f in export_formats or []:
        if f not in FORMATS:
            raise RdquantError(f"--export {f!r}: choose one of {', '.join(FORMATS)}")
        check_output(export_path(out, f), overwrite, flag="--export") if f != "gguf" else None
    source = streamed_source(model, cfg)  # an HF directory of safetensors: read one block at a time
    if source is not None:
        m, tok, model_id = source.model, source.tokenizer, source.model_id
    else:
        m, tok, model_id = load_model(model)
    for f in export_formats or []:  # the layers this run will write must fit the format: refuse now
        check_before_compress(f, m, cfg)
    check_seqlen(m, cfg.calib_seqlen, "--calib-seqlen")
    if eval_:
        check_seqlen(m, eval_seqlen, "--eval-seqlen")
    if ckpt.exists() and not resume:
        remove_owned(ckpt)
    original = None
    if eval_:
        original = evaluate(load_model(model)[0] if source is not None else m, tok, seqlen=eval_seqlen, max_windows=eval_windows, device=cfg.device, progress=progress)
    try:
        cm = api_compress(source or m, cfg, tokenizer=tok, checkpoint_dir=ckpt, resume=resume, progress=progress, model_id=model_id)
    except KeyboardInterrupt:
        if blocks_done(ckpt):
            command = _resume_command(model, out, recipe, given, experimental, codec, eval_, export_formats or [])
            typer.echo(f"\ninterrupted: {blocks_done(ckpt)} finished blocks are kept in {ckpt}; continue with:\n"
                       f"  {command} --resume", err=True)
        else:
            remove_owned(ckpt)
            typer.echo("\ninterrupted before the first block finished: nothing to resume", err=True)
        raise typer.Exit(130)
    except BaseException:
        if not blocks_done(ckpt):
            remove_owned(ckpt)  # no empty checkpoints left behind
        raise
    cm.save(out, overwrite=overwrite, codec=codec, speed_floor_mbps=speed_floor)
    remove_owned(ckpt)
    rep = api_inspect(out, verify=False)
    typer.echo(f"wrote {out} in {cm.seconds:.1f} s compress time")
    for f in export_formats or []:
        from .export import export as api_export

        typer.echo(f"exported as {f}: {api_export(out, export_path(out, f), format=f, overwrite=overwrite, progress=progress)}")
    typer.echo(rep.table(per_layer=False))
    if original is not None:
        q = evaluate(str(out) if cm.streamed else cm, seqlen=eval_seqlen, max_windows=eval_windows, device=cfg.device, progress=progress)
        typer.echo(f"\nWikiText-2 perplexity ({q.windows} windows x {q.seqlen} = {q.tokens} tokens)")
        typer.echo(f"  original (16-bit: {rep.original_16bit_bytes / 2**20:7.1f} MiB)  ppl {original.ppl:8.3f}")
        typer.echo(f"  rdquant  ({rep.total_bytes / 2**20:7.1f} MiB, {rep.bits_per_weight:.3f} bpw)  ppl {q.ppl:8.3f}")


def streamed_source(model: str, cfg):
    """A LazyBlocks source for an HF directory with safetensors weights when the run can stream (not
    for GGUF files or aliases, which transformers dequantizes whole, nor for methods that need every
    weight at once: ecsq, whole-model distillation tuning, cvxq's Hessian-proxy sensitivity); else None."""
    import torch

    from .models import check_config, load_tokenizer_of, resolve_model
    from .source import LazyBlocks

    loc = resolve_model(model)
    if loc.gguf_file or not any(loc.path.glob("*.safetensors")):
        return None
    if cfg.method == "ecsq" or cfg.tunes("model") or (
            cfg.method == "cvxq" and cfg.cvxq_sensitivity == "hessian"):
        return None
    check_config(loc)
    tok = load_tokenizer_of(loc)
    try:
        # on a GPU, calibrate in the checkpoint's 16-bit dtype
        source = LazyBlocks(loc.path, torch.float32 if cfg.device == "cpu" else None)
    except RdquantError:  # names the model does not use as stored (transformers may convert them): in memory
        return None
    source.tokenizer, source.model_id = tok, loc.model_id
    return source


def _resume_command(model: str, out: Path, recipe: Optional[Path], given: dict, experimental: list[str], codec: str,
                    eval_: bool, export_formats: list[str] = ()) -> str:
    """The command line that continues this run: the same settings, with --resume."""
    args = ["rdquant", "compress", "--model", model, "--out", str(out)]
    if recipe:
        args += ["--recipe", str(recipe)]
    for key, value in given.items():
        flag = flag_of(key)
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            args += [flag, str(value)]
    for pair in experimental:
        args += ["--experimental", pair]
    if codec != "none":
        args += ["--codec", codec]
    if eval_:
        args.append("--eval")
    for f in export_formats:
        args += ["--export", f]
    return " ".join(shlex.quote(a) for a in args) + " --resume"


def _make_compress():
    run = "Options of the run"

    def compress(
        ctx: typer.Context,
        model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="HF directory, .gguf file or alias", rich_help_panel=run),
        out: Optional[Path] = typer.Option(None, "--out", "-o", show_default="artifacts/<model>-<method>-<size>, a fresh name",
                                           help="artifact directory to write", rich_help_panel=run),
        recipe: Optional[Path] = typer.Option(None, help="YAML recipe of these options; flags given here override it",
                                              show_default="none", rich_help_panel=run),
        resume: bool = typer.Option(False, help="continue an interrupted run from its last finished block", rich_help_panel=run),
        overwrite: bool = typer.Option(False, help="replace --out if it holds an rdquant artifact (never anything else), "
                                                   "and discard an interrupted run's checkpoint", rich_help_panel=run),
        codec: str = typer.Option("none", help="entropy coding of the quantized tensors: none | zstd-L | lz4 | ans | auto",
                                  rich_help_panel=run),
        speed_floor: float = typer.Option(DEFAULT_SPEED_FLOOR_MBPS, "--codec-speed-floor",
                                          help="auto: slowest decode allowed, MB/s", rich_help_panel=run),
        eval_: bool = typer.Option(False, "--eval", help="also print WikiText-2 perplexity, original vs compressed",
                                   show_default="off", rich_help_panel=run),
        eval_windows: int = typer.Option(8, "--eval-windows", help="windows for --eval", rich_help_panel=run),
        eval_seqlen: int = typer.Option(2048, "--eval-seqlen", help="tokens per --eval window", rich_help_panel=run),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars", rich_help_panel=run),
        experimental: list[str] = typer.Option([], "--experimental", metavar="KEY=VALUE", hidden=True,
                                               help="options that lost to the defaults (docs/notes)"),
        export_formats: list[str] = typer.Option([], "--export", metavar="FORMAT",
                                                 help="also export: compressed-tensors | gptq | gguf (repeatable; "
                                                      "checked before calibration)", rich_help_panel=run),
        **settings,
    ) -> None:
        _run_compress(ctx, model, out, recipe, resume, overwrite, codec, speed_floor, eval_, eval_windows, eval_seqlen,
                      progress, experimental, export_formats, **settings)

    sig = inspect.signature(compress)
    params = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD] + _config_parameters()
    compress.__signature__ = sig.replace(parameters=params)
    compress.__annotations__ = {**{k: v for k, v in compress.__annotations__.items()},
                                **{p.name: p.annotation for p in _config_parameters()}}
    compress.__doc__ = "Quantize a model's linear layers and write a packed artifact."
    return compress


app.command()(friendly(_make_compress()))


@app.command("eval")
@friendly
def eval_cmd(
    model: str = typer.Argument(..., help="artifact directory, HF directory, .gguf file or alias"),
    data: str = typer.Option("wikitext2", help="wikitext2 or a text/JSONL file"),
    seqlen: int = typer.Option(2048, help="tokens per window (at most the model's context)"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="score only the first N windows",
                                              show_default="all"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N"),
    backend: str = typer.Option("auto", help="how quantized layers compute: auto | reference | cached | triton | int4-cpu"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON", show_default="off"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="bound the memory the weights take (e.g. 200MB): "
                                             "decoder blocks beyond it are streamed from the artifact per forward",
                                             show_default="no limit"),
) -> None:
    """Perplexity with the standard protocol (non-overlapping windows, exp of mean NLL)."""
    from dataclasses import asdict

    from .config import check_device
    from .data import check_seqlen, eval_text
    from .evaluate import evaluate, load_any

    _positive("--seqlen", seqlen, 2)
    _positive("--max-windows", max_windows)
    check_device(device)
    _check_backend(backend)
    eval_text(data)  # the data exist and are UTF-8 text
    m, tok = load_any(model, device=device, backend=backend, max_memory=max_memory)
    check_seqlen(m, seqlen)
    r = evaluate(m, tok, data=data, seqlen=seqlen, max_windows=max_windows, device=device, progress=progress)
    if as_json:
        typer.echo(json.dumps(asdict(r)))
    else:
        typer.echo(f"{model}: ppl {r.ppl:.4f} on {data} ({r.windows} windows x {r.seqlen} = {r.tokens} tokens, {r.seconds:.1f} s)")
    _report_streaming(m)


@app.command("inspect")
@friendly
def inspect_cmd(
    artifact: Path = typer.Argument(...),
    layers: bool = typer.Option(True, "--layers/--no-layers", help="per-layer table"),
    as_json: bool = typer.Option(False, "--json", help="print the totals as JSON", show_default="off"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="check every tensor's sha256 (damage is an error)"),
    decode_speed: bool = typer.Option(True, "--decode-speed/--no-decode-speed",
                                      help="coded artifacts: decode every coded qweight once and report codes/s"),
) -> None:
    """Per-layer table and totals: params, all-in bits/weight, bytes on disk, compression ratio; for coded
    artifacts also the codes' entropy, codec, mapping and measured decode speed."""
    from .report import inspect as api_inspect

    rep = api_inspect(artifact, decode_speed=decode_speed, verify=verify)
    if as_json:
        typer.echo(json.dumps({"bits_per_weight": rep.bits_per_weight, "total_bytes": rep.total_bytes,
                               "quantized_params": rep.quantized_params, "quantized_bytes": rep.quantized_bytes,
                               "dense_bytes": rep.dense_bytes, "compression_ratio": rep.compression_ratio,
                               "file_bits_per_param": rep.file_bits_per_param,
                               "vocab_params": rep.vocab_params, "vocab_bytes": rep.vocab_bytes,
                               "split_bits_per_weight": rep.split_bits(),
                               "coded_bits_per_weight": rep.coded_bits_per_weight,
                               "decode_mcodes_per_s": rep.decode_mcodes,
                               "memory_bytes": rep.memory.total if rep.memory else None,
                               "min_max_memory_bytes": rep.memory.minimum if rep.memory else None}))
    else:
        typer.echo(rep.table(per_layer=layers))


@app.command("export")
@friendly
def export_cmd(
    artifact: Path = typer.Argument(..., help="artifact directory to export"),
    out: Path = typer.Option(..., "--out", "-o", help="model directory to write (gguf: a .gguf file); new, or "
                                                       "rdquant's own with --overwrite"),
    format: str = typer.Option("compressed-tensors", "--format", "-f", help="compressed-tensors | gptq | gguf"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if rdquant wrote it", show_default="off"),
) -> None:
    """Write the artifact in a format other tools load: compressed-tensors (pack-quantized: transformers,
    vLLM), gptq (GPTQModel, transformers' GPTQ path) or gguf (llama.cpp: Q4_0 / Q8_0 from symmetric group-32
    codes, the k-quants of --grid gguf:TYPE). Layers the format cannot hold exactly are refused by name, never
    re-quantized."""
    from .artifact import read_manifest
    from .export import export, plan, vllm_check

    path = export(artifact, out, format=format, overwrite=overwrite)
    typer.echo(f"exported {artifact} as {format} to {path}")
    if format == "compressed-tensors":
        q = read_manifest(artifact)["quantized"]
        typer.echo(f"vLLM (rules read from its source, not run here): {vllm_check(q, plan(q, format))}")


@app.command()
@friendly
def recode(
    artifact: Path = typer.Argument(..., help="artifact directory to re-code"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to write"),
    codec: str = typer.Option("auto", help="none | zstd-L | lz4 | ans | auto"),
    speed_floor: float = typer.Option(DEFAULT_SPEED_FLOOR_MBPS, "--codec-speed-floor", help="auto: slowest decode allowed, MB/s"),
    dense: bool = typer.Option(False, help="also code the tensors left in 16 bit"),
    overwrite: bool = typer.Option(False, help="replace --out if it holds an rdquant artifact (never anything else)"),
) -> None:
    """Copy an artifact with its tensors entropy-coded (or decoded, with --codec none); the model is
    bit-identical."""
    from .artifact import read_manifest
    from .coding import recode as api_recode
    from .report import inspect as api_inspect
    from .safety import check_output

    check_codec(codec)
    if speed_floor <= 0:
        raise RdquantError("--codec-speed-floor must be a positive speed in MB/s")
    read_manifest(artifact)
    if out.resolve() == artifact.resolve():
        raise RdquantError("--out is the artifact being re-coded; write the copy to another directory")
    check_output(out, overwrite)
    api_recode(artifact, out, codec=codec, speed_floor_mbps=speed_floor, dense=dense, overwrite=overwrite)
    typer.echo(api_inspect(out, verify=False).table(per_layer=False))


@app.command()
@friendly
def generate(
    model: str = typer.Argument(..., help="artifact directory, HF directory, .gguf file or alias"),
    prompt: str = typer.Option("The capital of France is", "--prompt", "-p", help="text to continue"),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens", help="tokens to generate"),
    chat: bool = typer.Option(False, help="wrap the prompt in the tokenizer's chat template"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N"),
    backend: str = typer.Option("auto", help="how quantized layers compute: auto | reference | cached | triton | int4-cpu"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="bound the memory the weights take (e.g. 200MB): "
                                             "decoder blocks beyond it are streamed from the artifact per forward",
                                             show_default="no limit"),
) -> None:
    """Greedy generation from a prompt; prints the text, then the speed (tokens/s) on stderr."""
    import time

    import torch

    from .config import check_device
    from .data import check_seqlen
    from .evaluate import load_any

    _positive("--max-new-tokens", max_new_tokens)
    check_device(device)
    _check_backend(backend)
    m, tok = load_any(model, device=device, backend=backend, max_memory=max_memory)
    text = prompt
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt").to(device)
    n_prompt = enc["input_ids"].shape[1]
    if n_prompt == 0:
        raise RdquantError("--prompt is empty after tokenization; give some text")
    check_seqlen(m, n_prompt + max_new_tokens, "prompt + --max-new-tokens")
    from .runtime import QuantLinear

    t_prep = time.perf_counter()
    for q in m.modules():  # fill the dequantized-weight caches up front, so tokens/s is the steady speed
        if isinstance(q, QuantLinear) and q.backend == "cached":
            q.dequantized_weight()
    prep = time.perf_counter() - t_prep
    from .kvcache import QuantizedKVCache, cache_kwarg, has_kv

    kv = {cache_kwarg(m): QuantizedKVCache(m)} if has_kv(m) else {}  # the artifact's quantized KV cache
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = m.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id, **kv)
    seconds = time.perf_counter() - t0
    if kv:
        cache = next(iter(kv.values()))
        typer.echo(f"[KV cache: {cache.nbytes() / 2**20:.2f} MiB for {cache.get_seq_length()} tokens, "
                   f"{cache.layers[0].params.spec.bits}-bit]", err=True)
    new = out[0][n_prompt:]
    typer.echo(tok.decode(new, skip_special_tokens=True))
    from .backends import describe

    counts: dict[str, int] = {}
    for q in m.modules():
        if isinstance(q, QuantLinear):
            counts[q.backend] = counts.get(q.backend, 0) + 1
    runtime = f"backends: {describe(counts)}" if counts else "original model"
    typer.echo(f"[{new.numel()} tokens in {seconds:.2f} s: {new.numel() / max(seconds, 1e-9):.1f} tokens/s, "
               f"{device}, {runtime}" + (f"; weights dequantized once in {prep:.2f} s" if prep > 0.01 else "") + "]", err=True)
    _report_streaming(m)


def _report_streaming(m) -> None:
    """On stderr: how a model loaded with --max-memory was laid out and what streaming cost."""
    plan = getattr(m, "_rdquant_plan", None)
    if plan is None:
        return
    from .stream import streamer_of

    st = streamer_of(m)
    line = f"[--max-memory: {plan.describe()}"
    if st is not None:
        s = st.stats
        line += (f"; read {s.bytes_read / 2**20:,.1f} MiB in {s.blocks_read} block reads ({s.read_s:.2f} s reading, "
                 f"{s.decode_s:.2f} s decoding, {s.wait_s:.2f} s waited)")
    typer.echo(line + "]", err=True)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
