"""Build a calibration set: sources -> templated documents -> token rows -> `CalibrationSet`.

Deterministic: the same sources, options and tokenizer give byte-identical ids and card
(every random choice comes from `derived_rng(seed, ...)`, nothing depends on time or paths
outside the card).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from solar_quant import progress
from solar_quant.calibration.artifact import (CalibrationSet, check_tokenizer, ids_sha256, load_calibration, load_tokenizer,
                                             tokenizer_identity)
from solar_quant.calibration.bundled import default_sources, display_name
from solar_quant.calibration.sampling import (DocumentEncoder, Rows, count_rows, derived_rng, length_histogram,
                                              max_nsamples, mix_quotas, take_rows)
from solar_quant.calibration.sources import SourceReader, open_source, parse_source_flags
from solar_quant.calibration.templates import TEMPLATE_NAMES, get_template
from solar_quant.errors import CalibrationError, OptionError
from solar_quant.options import CalibrationOptions, build

CARD_FORMAT = "solar-quant calibration v1"


def calibration_options(source: list[str] | None, fmt: list[str] | None, *, template: str, nsamples: int,
                        seqlen: int, seed: int, short: str) -> CalibrationOptions:
    """CLI flags -> validated options (errors name the flag)."""
    if template not in TEMPLATE_NAMES:
        raise OptionError(f"--template {template!r}: unknown template; choose one of {', '.join(TEMPLATE_NAMES)}")
    if short not in ("pack", "drop"):
        raise OptionError(f"--short {short!r}: expected pack or drop")
    return build(CalibrationOptions, sources=parse_source_flags(source, fmt), template=template, nsamples=nsamples,
                 seqlen=seqlen, seed=seed, short=short)


def _documents(reader: SourceReader, seed: int, index: int):
    order = list(range(reader.count))
    derived_rng(seed, "documents", index).shuffle(order)
    return (reader.document(i) for i in order)


def _not_enough(readers, names, quotas, opts, encoder, got: dict[int, int]) -> CalibrationError:
    """Count what every source can give and say so."""
    available = [got[i] if i in got else count_rows(encoder.stream(_documents(r, opts.seed, i)), opts.seqlen, opts.short)
                 for i, r in enumerate(readers)]
    weights = [r.spec.weight for r in readers]
    short = next(i for i, (q, a) in enumerate(zip(quotas, available)) if a < q)
    if available[short] == 0:
        why = (f"all {readers[short].count} documents are shorter than --seqlen {opts.seqlen}; use --short pack or a smaller --seqlen"
               if opts.short == "drop" else f"its {readers[short].count} documents hold fewer than --seqlen {opts.seqlen} tokens")
        return CalibrationError(f"{names[short]} gives no samples of {opts.seqlen} tokens after filtering: {why}")
    return CalibrationError(
        f"--nsamples {opts.nsamples} is more than the sources can give: {names[short]} gives {available[short]} samples of "
        f"{opts.seqlen} tokens but its weight asks for {quotas[short]}; at most {max_nsamples(weights, available)} "
        f"with these weights ({sum(available)} available in all: "
        + ", ".join(f"{n} {a}" for n, a in zip(names, available))
        + "); lower --nsamples or --seqlen, change the weights, or add data")


def build_calibration(model_path: str | Path, opts: CalibrationOptions,
                      log: Callable[[str], None] = progress.log) -> CalibrationSet:
    """Token rows [nsamples, seqlen] mixed from `opts.sources` (empty: the bundled default)."""
    specs = list(opts.sources) or default_sources()
    names = [display_name(s.path) for s in specs]
    readers = [open_source(s, log, n) for s, n in zip(specs, names)]
    for reader, name in zip(readers, names):
        if reader.count == 0:
            raise CalibrationError(f"{name}: no usable documents after filtering ({reader.records} records, "
                                   f"{reader.skipped_empty} with empty text); check the file or its --format")
    tokenizer = load_tokenizer(model_path)
    template = get_template(opts.template, tokenizer)
    quotas = mix_quotas([s.weight for s in specs], opts.nsamples)
    encoder = DocumentEncoder(tokenizer, template)
    taken: list[Rows] = []
    for i, (reader, quota) in enumerate(zip(readers, quotas)):
        rows = take_rows(encoder.stream(_documents(reader, opts.seed, i)), opts.seqlen, opts.short, quota)
        if len(rows.rows) < quota:
            raise _not_enough(readers, names, quotas, opts, encoder, {i: len(rows.rows)})
        log(f"calibration: {names[i]}: {len(rows.rows)} samples from {rows.documents} documents")
        taken.append(rows)
    all_rows = [r for t in taken for r in t.rows]
    derived_rng(opts.seed, "rows").shuffle(all_rows)
    ids = torch.from_numpy(np.stack([np.frombuffer(r, dtype=np.int64) for r in all_rows]).copy())
    card = _card(opts, names, readers, quotas, taken, encoder, tokenizer_identity(model_path, tokenizer))
    card["sha256"] = ids_sha256(ids)
    return CalibrationSet(ids, card)


def _card(opts, names, readers, quotas, taken, encoder, identity) -> dict:
    sources = [{
        "path": name, "format": r.format, "weight": r.spec.weight, "sha256": r.sha256, "records": r.records,
        "skipped_empty": r.skipped_empty, "samples": len(t.rows), "share": len(t.rows) / opts.nsamples,
        "documents": t.documents, "tokens": t.tokens, "truncated": t.truncated, "dropped_short": t.dropped_short,
    } for name, r, t in zip(names, readers, taken)]
    return {
        "format": CARD_FORMAT,
        "nsamples": opts.nsamples, "seqlen": opts.seqlen, "seed": opts.seed, "short": opts.short,
        "template": opts.template, "tokens": opts.nsamples * opts.seqlen,
        "mix": "weights are shares of samples; every sample holds seqlen tokens of one source",
        "sources": sources,
        "documents": sum(t.documents for t in taken),
        "truncations": sum(t.truncated for t in taken),
        "dropped_short": sum(t.dropped_short for t in taken),
        "length_histogram": length_histogram(n for t in taken for n in t.lengths),
        "special_tokens": encoder.specials.card(),
        "tokenizer": identity,
    }


def summary(calib: CalibrationSet) -> str:
    """A few lines for the terminal: samples, documents, tokens and truncations per source."""
    c = calib.card
    lines = [f"{c['nsamples']} samples x {c['seqlen']} tokens, template {c['template']}, short={c['short']}, seed {c['seed']}"]
    width = max(len(s["path"]) for s in c["sources"])
    for s in c["sources"]:
        lines.append(f"  {s['path']:<{width}}  {s['samples']:>5} samples ({s['share']:.0%})  {s['documents']:>6} documents  "
                     f"{s['tokens']:>9,} tokens  {s['truncated']} truncated  {s['dropped_short']} dropped short")
    lines.append(f"sha256 {c['sha256']}")
    return "\n".join(lines)


def calibration_from_cli(model_path, calibration, source, fmt, *, template: str = "solar", nsamples: int = 128,
                         seqlen: int = 2048, seed: int = 0, short: str = "pack") -> CalibrationSet:
    """What a command's calibration flags ask for: a saved artifact (checked against the model's
    tokenizer) or a set built now from `--source/--format/--template/...` (default: bundled)."""
    if calibration:
        if source or fmt:
            raise OptionError("give either --calibration (a saved artifact) or --source/--format, not both")
        calib = load_calibration(calibration)
        check_tokenizer(calib, model_path, calibration)
        return calib
    return build_calibration(model_path, calibration_options(source, fmt, template=template, nsamples=nsamples,
                                                             seqlen=seqlen, seed=seed, short=short))
