"""bitsandbytes 4-bit on CPU takes one of two kernels, and eval says which.

Where the CPU has AVX-512-bf16, bitsandbytes 0.50 repacks a Linear4bit's weights at its first
forward and runs a fused kernel on bf16 activations (`Linear4bit.support_avx512bf16_for_cpu`,
set from `bitsandbytes.functional.has_avx512bf16()`); elsewhere it dequantizes the weights and
runs a plain matmul. `SOLAR_QUANT_BNB_CPU_KERNEL=generic` forces the second branch on any machine,
so this file runs the same assertions both ways: forced generic everywhere, and "auto", which is
the AVX-512-bf16 branch exactly where the machine has it. Each branch is checked for what it
must do: which layers are repacked, the report note, and logits against a plain fp32 model
holding the de-quantized weights (max |difference| / max |logit|: generic ≤ 1e-4, measured 0;
AVX-512-bf16, whose activations are bf16, ≤ 3e-2, measured 7.7e-3 on the tiny model).
"""

from __future__ import annotations

import pytest
import torch

from solar_quant.errors import OptionError
from solar_quant.evaluate.loading import load_model
from solar_quant.formats.entries.bitsandbytes import BNB_CPU_KERNEL_ENV, bnb_cpu_kernel_allowed, bnb_kernel_note

TOLERANCE = {"generic": 1e-4, "avx512-bf16": 3e-2}


@pytest.fixture(scope="module")
def nf4(tiny_llama, tmp_path_factory):
    """tiny_llama (hidden 64, intermediate 160) as nf4 with float32 compute: down_proj's 160 inputs
    are not a multiple of the blocksize 64, the other six linears' 64 are."""
    from solar_quant.options import BnbOptions, OutputOptions
    from solar_quant.pipeline.bnb import build_bnb_variant

    out = tmp_path_factory.mktemp("bnb-kernel") / "nf4"
    return build_bnb_variant(str(tiny_llama), str(out), BnbOptions(method="bnb-nf4", compute_dtype="float32"),
                             OutputOptions(), log=lambda *_: None)


class _Dequantized(torch.nn.Module):
    """x @ W.T in fp32, returned in x's dtype (as Linear4bit returns it)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self.weight.t()).to(x.dtype)


def _reference_logits(model4, ids: torch.Tensor) -> torch.Tensor:
    """The same model with each Linear4bit replaced by a plain fp32 Linear holding its de-quantized
    weight (everything else, dtypes included, as loaded), so only the 4-bit kernel differs."""
    import copy

    ref = copy.deepcopy(model4)
    for name, m in model4.named_modules():
        if type(m).__name__ == "Linear4bit":  # de-quantized straight to fp32, as the generic kernel does
            s = m.weight.quant_state
            w = torch.ops.bitsandbytes.dequantize_4bit.default(m.weight.data, s.absmax, s.blocksize, s.quant_type,
                                                               s.shape, torch.float32)
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, _Dequantized(w))
    with torch.no_grad():
        return ref(ids).logits.float()


@pytest.mark.parametrize("kernel", ["generic", "auto"])
def test_each_branch_repacks_the_right_layers_says_so_and_matches_the_dequantized_model(nf4, tiny_llama, kernel,
                                                                                        monkeypatch):
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    monkeypatch.setenv(BNB_CPU_KERNEL_ENV, kernel)
    avx = kernel == "auto" and bool(has_avx512bf16())  # the branch this machine takes
    assert bnb_cpu_kernel_allowed() == avx
    loaded = load_model(str(nf4), torch.device("cpu"), torch.float32)
    layers = {n: m for n, m in loaded.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    partial = {n for n, m in layers.items() if m.in_features % 64}
    assert len(layers) == 14 and len(partial) == 2  # both kinds of layer are exercised
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    expected = _reference_logits(loaded.model, ids)  # before the first forward repacks anything
    with torch.no_grad():
        got = loaded.model(ids).logits.float()

    repacked = {n for n, m in layers.items() if getattr(m.weight.quant_state, "packing_format_for_cpu", False)}
    assert repacked == (set(layers) - partial if avx else set())
    assert (bnb_kernel_note(12, 2) if avx else bnb_kernel_note(0, 14)) in loaded.notes, loaded.notes
    err = float((got - expected).abs().max() / expected.abs().max())
    assert err <= TOLERANCE["avx512-bf16" if avx else "generic"], err
    assert expected.std() > 0.1  # not a degenerate output


def test_an_unknown_kernel_choice_is_refused(monkeypatch):
    monkeypatch.setenv(BNB_CPU_KERNEL_ENV, "fast")
    with pytest.raises(OptionError, match=f"{BNB_CPU_KERNEL_ENV}='fast': expected auto or generic"):
        bnb_cpu_kernel_allowed()
