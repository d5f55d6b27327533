"""`solar-quant eval`: windows, KL math, passkey, baseline cache, rope handling, reports, gates, bad input.

Models are a small random Llama (sharpened so its distributions are not flat) and variants made
from it here: bitsandbytes int8 / nf4 through transformers, RTN fake-quantized fp16 copies (4-bit
and a broken 2-bit), a copy whose config carries dynamic rope, and a hand-packed GPTQ v1 folder.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_clean_failure, cli
from solar_quant.errors import DependencyError, InputError, OptionError

TEXT = (
    "When in the Course of human events, it becomes necessary for one people to dissolve the political bands "
    "which have connected them with another, and to assume among the powers of the earth, the separate and equal "
    "station to which the Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of "
    "mankind requires that they should declare the causes which impel them to the separation.\n\n"
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
    "Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great "
    "civil war, testing whether that nation, or any nation so conceived and so dedicated, can long endure.\n\n"
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, and "
    "nothing particular to interest me on shore, I thought I would sail about a little and see the watery part "
    "of the world. It is a way I have of driving off the spleen and regulating the circulation.\n\n"
)


# -- fixtures: models ---------------------------------------------------------------------
def _copy_folder(src: Path, dst: Path, tensors: dict | None = None, config: dict | None = None) -> Path:
    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "manifest.json", "model.safetensors.index.json"):
            shutil.copy(f, dst / f.name)
    if tensors is None:
        for f in src.glob("*.safetensors"):
            shutil.copy(f, dst / f.name)
        if (src / "model.safetensors.index.json").is_file():
            shutil.copy(src / "model.safetensors.index.json", dst / "model.safetensors.index.json")
    else:
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config or cfg, indent=2))
    return dst


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def rtn_codes(w: torch.Tensor, bits: int, group: int):
    """Symmetric round-to-nearest on groups along the input dimension: codes, fp16 scales, zero point."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    maxq = 2**bits - 1
    scale = (g.abs().amax(-1, keepdim=True) / (maxq / 2)).clamp_min(1e-8)
    zero = (maxq + 1) // 2
    q = torch.clamp(torch.round(g / scale) + zero, 0, maxq)
    return q.reshape(n, k).to(torch.int32), scale.squeeze(-1).to(torch.float16), zero


def dequant(q, scale, zero, group):
    n, k = q.shape
    return ((q.reshape(n, k // group, group).float() - zero) * scale.float().unsqueeze(-1)).reshape(n, k)


def _pack(values: torch.Tensor, dim: int) -> torch.Tensor:
    """4-bit values packed 8 per int32 along `dim` (GPTQ v1: element j of a word at bit 4*j)."""
    v = values.to(torch.int64) & 0xF
    v = v.movedim(dim, 0)
    out = torch.zeros((v.shape[0] // 8, *v.shape[1:]), dtype=torch.int64)
    for j in range(8):
        out |= v[j::8] << (4 * j)
    return ((out + 2**31) % 2**32 - 2**31).to(torch.int32).movedim(0, dim).contiguous()


def fake_quant_variant(src: Path, dst: Path, bits: int, group: int) -> Path:
    sd = _state_dict(src)
    out = {k: dequant(*rtn_codes(v, bits, group), group).to(torch.float16) if k.endswith("proj.weight") else v
           for k, v in sd.items()}
    return _copy_folder(src, dst, out)


def gptq_variant(src: Path, dst: Path, group: int = 32) -> Path:
    """A GPTQ v1 folder (4-bit, symmetric, no act-order) holding the same grid as fake_quant_variant."""
    tensors = {}
    for name, t in _state_dict(src).items():
        if not name.endswith("proj.weight"):
            tensors[name] = t
            continue
        q, s, z = rtn_codes(t, 4, group)
        base, (n, k) = name[: -len(".weight")], t.shape
        tensors[base + ".qweight"] = _pack(q.t(), 0)
        tensors[base + ".qzeros"] = _pack(torch.full((k // group, n), z - 1), 1)
        tensors[base + ".scales"] = s.t().contiguous()
        tensors[base + ".g_idx"] = torch.arange(k, dtype=torch.int32) // group
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
                                  "sym": True, "checkpoint_format": "gptq", "pack_dtype": "int32", "lm_head": False}
    return _copy_folder(src, dst, tensors, cfg)


def bnb_variant(src: Path, dst: Path, kind: str) -> Path:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = (BitsAndBytesConfig(load_in_8bit=True) if kind == "int8" else
         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, quantization_config=q)
    model.save_pretrained(str(dst))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory, demo_model) -> dict[str, Path]:
    from solar_quant.models.synthetic import llama_config, write_random_llama

    root = tmp_path_factory.mktemp("eval-models")
    # std 0.3 makes the random model's next-token distributions peaked enough for top-1 and KL to mean something
    base = write_random_llama(root / "base", llama_config(), seed=0, std=0.3, tokenizer_from=demo_model)
    out = {"base": base,
           "rtn4": fake_quant_variant(base, root / "rtn4", 4, 32),
           "broken": fake_quant_variant(base, root / "rtn2", 2, 32),
           "int8": bnb_variant(base, root / "int8", "int8"),
           "nf4": bnb_variant(base, root / "nf4", "nf4")}
    cfg = json.loads((base / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    out["dynamic"] = _copy_folder(base, root / "dynamic", config=cfg)
    other = _copy_folder(base, root / "othertok")
    doc = json.loads((other / "tokenizer.json").read_text())
    doc["added_tokens"] = doc.get("added_tokens", [])[:-1]
    (other / "tokenizer.json").write_text(json.dumps(doc))
    out["othertok"] = other
    cfg = json.loads((base / "config.json").read_text())
    out["othervocab"] = _copy_folder(base, root / "othervocab", config={**cfg, "vocab_size": 32000})
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval-text") / "text.txt"
    path.write_text(TEXT * 6)
    return path


def opts(text_file, **kw):
    from solar_quant.options import EvalOptions

    return EvalOptions(text=str(text_file), **{"seqlen": 32, "max_tokens": 256, "passkey_trials": 0, **kw})


def quiet(*_a, **_k) -> None:
    pass


# -- pure functions -----------------------------------------------------------------------
def test_windows_score_every_target_once_with_overlap():
    from solar_quant.evaluate.windows import plan_windows

    windows = plan_windows(1000, seqlen=64, stride=16)
    scored = [w.start + p for w in windows for p in range(w.score_from, w.length)]
    assert len(scored) == len(set(scored))
    assert scored == list(range(1, windows[-1].start + 64))
    assert all(w.scored == 16 for w in windows[1:]) and windows[0].scored == 63
    plain = plan_windows(1000, seqlen=64)
    assert len(plain) == 1000 // 64 and all(w.score_from == 1 for w in plain)


def test_text_shorter_than_one_window_is_refused():
    from solar_quant.evaluate.windows import plan_windows

    with pytest.raises(InputError, match="fewer than one window"):
        plan_windows(100, seqlen=128)
    with pytest.raises(OptionError, match="--stride"):
        plan_windows(1000, seqlen=64, stride=65)


def test_kl_on_topk_plus_rest_is_exact_when_k_covers_vocab_and_a_lower_bound_otherwise():
    from solar_quant.evaluate.kl import compact, kl_compact, kl_full

    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(3 * torch.randn(50, 500, generator=gen), -1)
    logq = torch.log_softmax(logp + 0.3 * torch.randn(50, 500, generator=gen), -1)
    full = kl_full(logp, logq)
    torch.testing.assert_close(kl_compact(compact(logp, 500), logq), full, rtol=1e-5, atol=1e-7)
    approx = kl_compact(compact(logp, 32), logq)
    assert bool((approx <= full + 1e-6).all())
    assert approx.mean() > 0.5 * full.mean()  # most of the divergence sits in the top 32 of a peaked distribution
    assert float(kl_compact(compact(logp, 32), logp).abs().max()) == 0.0


def test_passkey_prompt_holds_the_key_once_at_the_stated_depth(models):
    from solar_quant.evaluate.loading import load_tokenizer
    from solar_quant.evaluate.passkey import FILLER, build_prompt

    tok = load_tokenizer(models["base"])
    for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
        p = build_prompt(tok, "48213", depth, 400, "solar")
        assert p.text.count("48213") == 1
        assert len(p.ids) <= 400 and p.filler_total > 20
        assert p.text.startswith("### User:\n") and p.text.endswith("### Assistant:\nThe pass key is")
        before = p.text[: p.text.index("48213")]
        after = p.text[p.text.index("48213"):]
        n_before = sum(before.count(s) for s in FILLER)
        n_after = sum(after.count(s) for s in FILLER)
        assert n_before + n_after == p.filler_total
        assert abs(n_before / p.filler_total - depth) <= 1 / p.filler_total
    chat = build_prompt(tok, "48213", 0.5, 400, "chat_template")
    assert chat.text.count("48213") == 1 and "<|im_start|>assistant" in chat.text


def test_passkey_scoring_accepts_only_the_exact_number():
    from solar_quant.evaluate.passkey import passkey_correct

    assert passkey_correct(" 48213.", "48213")
    assert passkey_correct(": 48213, remember", "48213")
    assert not passkey_correct(" 4821", "48213")
    assert not passkey_correct(" 482130", "48213")
    assert not passkey_correct(" 148213", "48213")
    assert not passkey_correct(" 48 213", "48213")
    assert not passkey_correct(" 12345 or 48213", "48213")
    assert not passkey_correct(" none", "48213")


# -- the library entry point ---------------------------------------------------------------
def independent_ppl(path: Path, text_file: Path, seqlen: int, stride: int, max_tokens: int) -> float:
    """The Hugging Face perplexity guide's loop with plain transformers `labels=` loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok(text_file.read_text(), return_tensors="pt").input_ids[:, :max_tokens]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1] - seqlen + 1, stride):
        end = begin + seqlen
        trg = end - prev_end
        x = ids[:, begin:end]
        labels = x.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            loss = model(x, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        total += loss.item() * n
        count += n
        prev_end = end
    return math.exp(total / count)


@pytest.mark.parametrize("stride", [32, 12])
def test_perplexity_matches_transformers_loss_and_self_comparison_is_exact(models, text_file, tmp_path, stride):
    from solar_quant.evaluate.run import evaluate

    report = evaluate(str(models["base"]), [str(models["base"])], opts(text_file, stride=stride), str(tmp_path), log=quiet,
                      show=quiet)
    base, same = report["models"]
    expected = independent_ppl(models["base"], text_file, 32, stride, 256)
    assert base["short"]["ppl"] == pytest.approx(expected, rel=1e-5)
    assert same["short"]["ppl_ratio"] == 1.0
    assert same["short"]["kl_mean"] == 0.0 and same["short"]["kl_p99"] == 0.0
    assert same["short"]["top1"] == 1.0
    assert base["short"]["tokens"] == report["protocol"]["sections"]["short"]["scored_tokens"]


@pytest.mark.slow
def test_variants_share_one_cached_baseline_and_quantized_folders_load(models, text_file, tmp_path, monkeypatch):
    from solar_quant.evaluate import run

    loads = []
    real = run.load_model
    monkeypatch.setattr(run, "load_model", lambda path, *a, **k: loads.append(Path(path).name) or real(path, *a, **k))
    o = opts(text_file, contexts=(64,))
    first = run.evaluate(str(models["base"]), [str(models["int8"]), str(models["nf4"])], o, str(tmp_path), log=quiet,
                         show=quiet)
    assert loads == ["base", "int8", "nf4"]
    assert set(first["models"][0]["cache"].values()) == {"computed"}
    second = run.evaluate(str(models["base"]), [str(models["rtn4"])], o, str(tmp_path), log=quiet, show=quiet)
    assert loads[3:] == ["rtn4"]  # the baseline was not loaded again
    assert set(second["models"][0]["cache"].values()) == {"hit"}
    assert second["models"][0]["short"] == first["models"][0]["short"]
    by_name = {m["name"]: m["short"] for m in first["models"] + second["models"]}
    for name in ("int8", "nf4", "rtn4"):
        assert 0 < by_name[name]["kl_mean"] and by_name[name]["top1"] < 1.0
    assert by_name["int8"]["kl_mean"] < by_name["nf4"]["kl_mean"]  # 8-bit is closer than 4-bit
    # nf4 on cpu: the note names the 4-bit kernel this machine runs (tests/test_bnb_cpu_kernel.py
    # checks both branches); intermediate 160 is not a multiple of the blocksize 64, so on the
    # AVX-512-bf16 path the down_proj layers fall back to the generic kernel
    from solar_quant.formats.entries.bitsandbytes import bnb_cpu_kernel_allowed, bnb_kernel_note

    expected = bnb_kernel_note(6 * 2, 1 * 2) if bnb_cpu_kernel_allowed() else bnb_kernel_note(0, 7 * 2)
    assert expected in first["models"][2]["notes"], first["models"][2]["notes"]
    # a changed protocol is a different cache entry, not a stale hit
    third = run.evaluate(str(models["base"]), [str(models["rtn4"])], opts(text_file, seqlen=48), str(tmp_path),
                         log=quiet, show=quiet)
    assert third["models"][0]["cache"]["short"] == "computed"


@pytest.mark.slow
def test_dynamic_scaling_changes_only_contexts_past_the_trained_length(models, text_file, tmp_path):
    from solar_quant.evaluate.run import evaluate

    def run(**kw):
        r = evaluate(str(models["base"]), [str(models["base"])], opts(text_file, contexts=(32, 96), bucket=16, **kw),
                     str(tmp_path / str(len(kw))), log=quiet, show=quiet)
        return r["models"][0]

    plain = run()
    scaled = run(rope_scaling="dynamic:2", trained_length=32)
    assert scaled["rope"]["rope_type"] == "dynamic" and scaled["rope"]["max_position_embeddings"] == 32
    assert scaled["short"]["ppl"] == plain["short"]["ppl"]  # seqlen 32 <= trained length
    assert scaled["long"]["32"]["overall"]["ppl"] == plain["long"]["32"]["overall"]["ppl"]
    late_plain = [b["nll"] for b in plain["long"]["96"]["buckets"][2:]]
    late_scaled = [b["nll"] for b in scaled["long"]["96"]["buckets"][2:]]
    assert all(abs(a - b) > 1e-4 for a, b in zip(late_plain, late_scaled))


def test_a_variant_saved_with_rope_settings_is_evaluated_with_them(models, text_file, tmp_path):
    from solar_quant.evaluate.run import evaluate

    report = evaluate(str(models["base"]), [str(models["dynamic"])], opts(text_file, contexts=(64, 128), bucket=32),
                      str(tmp_path), log=quiet, show=quiet)
    variant = report["models"][1]
    assert variant["rope"]["rope_type"] == "dynamic" and variant["rope"]["factor"] == 2.0
    assert variant["short"]["kl_mean"] == 0.0  # same weights; 32 tokens never trigger scaling
    assert variant["long"]["64"]["overall"]["kl_mean"] == 0.0  # max_position_embeddings 64: still unscaled
    assert variant["long"]["128"]["overall"]["kl_mean"] > 1e-4  # past 64 the rescaled frequencies apply


@pytest.mark.gptq_runtime
def test_gptq_folder_loads_and_matches_its_dequantized_fp16_twin(models, tmp_path, text_file):
    pytest.importorskip("gptqmodel", reason="the [gptq] extra is not installed")
    from solar_quant.evaluate.run import evaluate

    gptq = gptq_variant(models["base"], tmp_path / "gptq")
    report = evaluate(str(models["rtn4"]), [str(gptq)], opts(text_file, max_tokens=128), str(tmp_path / "out"),
                      log=quiet, show=quiet)
    assert report["models"][1]["identity"]["quant_method"] == "gptq"
    assert report["models"][1]["short"]["kl_mean"] < 1e-6
    assert report["models"][1]["short"]["top1"] == 1.0


def test_missing_gptq_runtime_names_the_extra(models, tmp_path, monkeypatch):
    import importlib

    from solar_quant.evaluate import loading

    folder = gptq_variant(models["base"], tmp_path / "gptq")
    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "gptqmodel":
            raise ImportError("No module named 'gptqmodel'")
        return real(name, *a, **k)

    monkeypatch.setattr(loading.importlib, "import_module", fake)
    with pytest.raises(DependencyError, match=r"gptqmodel.*solar-quant\[gptq\]"):
        loading.load_model(folder, torch.device("cpu"), torch.float32)


def test_device_map_file_is_read_and_checked(tmp_path):
    from solar_quant.evaluate.loading import read_device_map

    f = tmp_path / "map.json"
    f.write_text(json.dumps({"device_map": {"model.embed_tokens": 0, "lm_head": 1}}))
    assert read_device_map(str(f)) == {"model.embed_tokens": 0, "lm_head": 1}
    assert read_device_map("auto") == "auto"
    with pytest.raises(OptionError, match="--device-map"):
        read_device_map(str(tmp_path / "missing.json"))


# -- the CLI ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_writes_reports_and_a_broken_variant_fails_its_gate(models, text_file, tmp_path):
    out = tmp_path / "report"
    proc = cli("eval", models["base"], models["int8"], models["broken"], "--text", text_file, "--seqlen", "32",
               "--max-tokens", "192", "--context", "128", "--bucket", "32", "--passkey-trials", "1",
               "--passkey-depths", "0.2,0.8", "--max-kld", "0.05", "--min-top1", "0.8", "-o", out)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert_clean_failure(proc, "rtn2", "kl_mean")
    error = [line for line in proc.stderr.splitlines() if line.startswith("solar-quant: error:")][0]
    assert "int8" not in error  # the good variant passed the same gates
    report = json.loads((out / "report.json").read_text())
    assert report["gates"]["passed"] is False
    failed = {(g["model"], g["check"]) for g in report["gates"]["results"] if not g["passed"]}
    assert ("rtn2", "kl_mean") in failed and not any(m == "int8" for m, _ in failed)
    p = report["protocol"]
    assert p["text"]["sha256"] and p["tokens"] > 192 and p["sections"]["short"]["seqlen"] == 32
    assert p["sections"]["short"]["stride"] == 32 and p["dtype"] == "float32" and p["device"] == "cpu"
    assert report["versions"]["torch"] and all("load_s" in m and "eval_s" in m for m in report["models"])
    assert [b["start"] for b in report["models"][1]["long"]["128"]["buckets"]] == [0, 32, 64, 96]
    assert set(report["models"][1]["passkey"]["128"]) == {"0.2", "0.8"}
    for png in report["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| rtn2 |" in (out / "report.md").read_text()
    assert "rtn2" in proc.stdout and "FAIL" in proc.stdout  # console table


def test_cli_refuses_a_different_tokenizer_short_text_and_missing_gptq_runtime(models, text_file, tmp_path):
    proc = cli("eval", models["base"], models["othertok"], "--text", text_file, "-o", tmp_path / "o1")
    assert_clean_failure(proc, "othertok", "tokenizer.json")
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill a window.")
    assert_clean_failure(cli("eval", models["base"], models["rtn4"], "--text", short, "-o", tmp_path / "o2"),
                         "fewer than one window", "--seqlen 512")
    gptq = gptq_variant(models["base"], tmp_path / "gptq")
    hidden = tmp_path / "hide"
    hidden.mkdir()
    (hidden / "optimum.py").write_text("raise ImportError('optimum hidden for this test')\n")
    proc = cli("eval", models["base"], gptq, "--text", text_file, "--seqlen", "32", "--max-tokens", "64",
               "-o", tmp_path / "o3", env={"PYTHONPATH": f"{hidden}:{Path(__file__).resolve().parents[1]}"})
    assert_clean_failure(proc, "optimum", "pip install 'solar-quant[gptq]'")
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))


def test_bad_inputs_are_refused_before_any_model_loads(models, text_file, monkeypatch):
    from solar_quant.evaluate import run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    base = str(models["base"])
    with pytest.raises(InputError, match="othervocab.*vocab_size 32000"):
        run.prepare(base, [str(models["othervocab"])], opts(text_file))
    # memory is estimated before the text is read; the message gives the estimate and what is free
    with pytest.raises(OptionError, match=r"--context 50000000: .* needs about .* GiB .* free on cpu"):
        run.prepare(base, [str(models["rtn4"])], opts(text_file, contexts=(50_000_000,)))
    with pytest.raises(InputError, match="--context 4096: the text has only"):
        run.prepare(base, [str(models["rtn4"])], opts(text_file, contexts=(4096,)))
    with pytest.raises(OptionError, match="--context 64: too short for the passkey prompt"):
        run.prepare(base, [str(models["rtn4"])], opts(text_file, contexts=(64,), passkey_trials=1))
    with pytest.raises(OptionError, match="--rope-scaling"):
        run.prepare(base, [str(models["rtn4"])], opts(text_file, rope_scaling="dynamc:2"))


def test_text_sources_fail_cleanly(tmp_path, monkeypatch):
    from solar_quant.evaluate.text import read_text

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises((InputError, DependencyError), match="--text hf:no-such/dataset"):
        read_text("hf:no-such/dataset")
    with pytest.raises(InputError, match="no such file"):
        read_text(str(tmp_path / "missing.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InputError, match="not UTF-8"):
        read_text(str(tmp_path / "bin.txt"))
    (tmp_path / "ok.txt").write_text("hello")
    t = read_text(str(tmp_path / "ok.txt"))
    assert t.sha256 == __import__("hashlib").sha256(b"hello").hexdigest()
