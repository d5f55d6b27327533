"""`solar-quant eval BASELINE VARIANT...`: perplexity, KL, long context and passkey vs the baseline."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from solar_quant.cli import options as o
from solar_quant import console
from solar_quant.cli.errors import friendly


def _numbers(values: list[str] | None, kind, flag: str) -> tuple:
    """Repeated flags and comma lists alike: ['512,1024', '2048'] -> (512, 1024, 2048)."""
    from solar_quant.errors import OptionError

    out = []
    for item in values or ():
        for part in filter(None, (p.strip() for p in str(item).split(","))):
            try:
                out.append(kind(part))
            except ValueError:
                raise OptionError(f"{flag} {part!r}: expected {'an integer' if kind is int else 'a number'}") from None
    return tuple(out)


@friendly
def eval_(
    baseline: Annotated[str, typer.Argument(help="The 16-bit baseline folder.")],
    variants: Annotated[list[str], typer.Argument(help="One or more variant folders (fp16, bitsandbytes or GPTQ).")],
    out: Annotated[str, typer.Option(*o.OUT_FLAGS, help="Folder for report.json, report.md, plots and the baseline cache.")] = "eval-report",
    text: Annotated[Optional[str], typer.Option("--text", help="UTF-8 text file, or hf:NAME[:CONFIG[:SPLIT]] from the local datasets cache; default: the bundled held-out text.")] = None,
    seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per short-context window.")] = 512,
    stride: Annotated[Optional[int], typer.Option("--stride", help="Tokens between window starts (default: --seqlen); smaller scores only each window's last STRIDE tokens.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Use at most this many tokens of the text for short-context windows.")] = None,
    kl_topk: Annotated[int, typer.Option("--kl-topk", help="Baseline log-probs cached per token (the rest is one bucket); >= vocab gives exact KL.")] = 256,
    context: Annotated[Optional[list[str]], typer.Option("--context", help="Long-context length(s): repeat the flag or give a comma list, e.g. --context 4096,8192.")] = None,
    long_windows: Annotated[int, typer.Option("--long-windows", help="Windows scored per --context length.")] = 2,
    bucket: Annotated[Optional[int], typer.Option("--bucket", help="Position-bucket width (default: context/8, 1024 past 8k).")] = None,
    rope_scaling: Annotated[Optional[str], typer.Option("--rope-scaling", help="Override every model's rope: none, dynamic:F, linear:F, or ntk-static:F (vLLM's static NTK base; default: each model's own config).")] = None,
    trained_length: Annotated[Optional[int], typer.Option("--trained-length", help="Set max_position_embeddings to N, emulating a short training window (dynamic scaling starts past N).")] = None,
    passkey_depths: Annotated[Optional[list[str]], typer.Option("--passkey-depths", help="Needle depths 0..1, comma list or repeated (default 0.1,0.5,0.9).")] = None,
    passkey_trials: Annotated[int, typer.Option("--passkey-trials", help="Random keys per context and depth; 0 disables the probe.")] = 3,
    passkey_template: Annotated[str, typer.Option("--passkey-template", help="auto (chat_template if the tokenizer has one, else solar), solar, chat_template or raw.")] = "auto",
    device: o.Device = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="Compute dtype: auto (fp32 on CPU, fp16 on CUDA), float32, float16, bfloat16.")] = "auto",
    device_map: Annotated[Optional[str], typer.Option("--device-map", help="auto, or a JSON file from `solar-quant plan --device-map-out` (spreads a model over GPUs).")] = None,
    cache_dir: Annotated[Optional[str], typer.Option("--cache-dir", help="Baseline cache folder (default: OUT/baseline-cache).")] = None,
    max_ppl_ratio: Annotated[Optional[float], typer.Option("--max-ppl-ratio", help="Gate: fail if a variant's perplexity / baseline's exceeds this.")] = None,
    max_kld: Annotated[Optional[float], typer.Option("--max-kld", help="Gate: fail if a variant's mean KL exceeds this.")] = None,
    min_top1: Annotated[Optional[float], typer.Option("--min-top1", help="Gate: fail if a variant's top-1 agreement is below this.")] = None,
    max_ppl_ratio_bucket: Annotated[Optional[float], typer.Option("--max-ppl-ratio-bucket", help="Gate: worst long-context bucket's perplexity ratio.")] = None,
    max_kld_bucket: Annotated[Optional[float], typer.Option("--max-kld-bucket", help="Gate: worst long-context bucket's mean KL.")] = None,
    tasks: Annotated[Optional[list[str]], typer.Option("--tasks", help="lm-eval tasks NAME[:SHOTS], comma list or repeated; h4 = Open LLM Leaderboard v1 (ARC, HellaSwag, MMLU, TruthfulQA). Needs the [tasks] extra.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="At most N items per task (per subtask of a group), for quick runs.")] = None,
    task_dir: Annotated[Optional[str], typer.Option("--task-dir", help="Folder of local lm-eval task YAMLs (dataset_path: json + data_files).")] = None,
    task_batch_size: Annotated[int, typer.Option("--task-batch-size", help="Loglikelihood requests per forward pass.")] = 8,
    generate: Annotated[Optional[str], typer.Option("--generate", help="JSON-lines prompt file: greedy answers of every model, compared with the baseline's.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens generated per --generate prompt.")] = 128,
    generate_template: Annotated[str, typer.Option("--generate-template", help="auto (chat_template if the tokenizer has one, else solar), solar, chat_template or raw.")] = "auto",
    max_task_drop: Annotated[Optional[float], typer.Option("--max-task-drop", help="Gate: a task's score drop vs the baseline, in metric units (0.01 = 1 point).")] = None,
    max_flips: Annotated[Optional[float], typer.Option("--max-flips", help="Gate: share of a task's items whose correct/incorrect outcome flips.")] = None,
    allow_quantized_baseline: Annotated[bool, typer.Option(
        "--allow-quantized-baseline", help="Accept a quantized BASELINE (to compare two variants with each other).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print report.json to stdout instead of the table.")] = False,
) -> None:
    """Compare VARIANTs with BASELINE (the 16-bit source) on the same tokens: perplexity, ratio, KL, top-1,
    long context, passkey; with --tasks, lm-eval task scores with paired deltas and flips; with --generate,
    greedy-answer fidelity.

    Writes OUT/report.json, OUT/report.md and PNG plots (the path goes to stderr; --json prints report.json);
    exits 1 when a gate fails.
    """
    from solar_quant.evaluate.run import evaluate
    from solar_quant.options import EvalOptions, build
    from solar_quant.signals import set_interrupt_hint

    set_interrupt_hint(f"interrupted; {out}/report.json is written only when the evaluation finishes; rerun the same "
                       f"command: baseline sections already scored are reused from {cache_dir or out + '/baseline-cache'}")

    contexts = _numbers(context, int, "--context")
    depths = _numbers(passkey_depths, float, "--passkey-depths") or (0.1, 0.5, 0.9)
    opts = build(EvalOptions, text=text, seqlen=seqlen, stride=stride, max_tokens=max_tokens, kl_topk=kl_topk,
                 contexts=contexts, long_windows=long_windows, bucket=bucket, rope_scaling=rope_scaling,
                 trained_length=trained_length, passkey_depths=depths,
                 passkey_trials=passkey_trials, passkey_template=passkey_template, device=device, dtype=dtype,
                 device_map=device_map, cache_dir=cache_dir, max_ppl_ratio=max_ppl_ratio, max_kld=max_kld,
                 min_top1=min_top1, max_ppl_ratio_bucket=max_ppl_ratio_bucket, max_kld_bucket=max_kld_bucket,
                 tasks=tuple(t.strip() for item in tasks or () for t in item.split(",") if t.strip()), limit=limit,
                 task_dir=task_dir, task_batch_size=task_batch_size, generate=generate, max_new_tokens=max_new_tokens,
                 generate_template=generate_template, max_task_drop=max_task_drop, max_flips=max_flips)
    from pathlib import Path

    from solar_quant.cli.streams import result_stdout
    from solar_quant.errors import GateError

    with result_stdout() as result:
        show = (lambda _table: None) if as_json else (lambda table: print(table, file=result, flush=True))
        try:
            evaluate(baseline, variants, opts, out, show=show, allow_quantized_baseline=allow_quantized_baseline)
        except GateError:
            _report_written(Path(out), as_json, result)
            raise
        _report_written(Path(out), as_json, result)


def _report_written(out, as_json: bool, result) -> None:
    """stdout gets the table (already shown) or report.json; stderr says where the report went."""
    if as_json:
        print((out / "report.json").read_text().rstrip("\n"), file=result, flush=True)
    typer.echo(f"report: {out / 'report.md'} and {out / 'report.json'}", file=console.stderr())


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_)
