"""The tokenizer identity read from the files (no transformers import) equals the one
transformers' loaded tokenizer gives, and steps aside wherever loading could add to the files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from solar_quant.calibration.artifact import _identity_from_files, load_tokenizer, tokenizer_identity
from tests.conftest import ROOT

VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "<|im_start|>": 5}


def _folder(tmp_path, config: dict, added: list[str] = ()):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if added:
        tok.add_special_tokens(list(added))
    tmp_path.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    return tmp_path


CASES = {
    "strings": ({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, (), True),
    "im-start": ({"bos_token": "<|im_start|>", "eos_token": "</s>",
                  "added_tokens_decoder": {"5": {"content": "<|im_start|>", "special": True}}}, (), True),
    "no-bos": ({"bos_token": None, "eos_token": "</s>"}, (), True),
    "added-tokens": ({"bos_token": "<s>", "eos_token": "<|end|>"}, ("<|end|>", "<|tool|>"), True),
    "pad-not-in-vocab": ({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, (), False),
    "bos-left-to-the-class": ({"eos_token": "</s>"}, (), False),
    "added-decoder-other-id": ({"bos_token": "<s>", "eos_token": "</s>",
                                "added_tokens_decoder": {"9": {"content": "</s>", "special": True}}}, (), False),
}


def test_a_token_written_as_a_dict_is_left_to_transformers(tmp_path):
    from solar_quant.errors import CalibrationError

    path = _folder(tmp_path, {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>"})
    assert _identity_from_files(path) is None
    with pytest.raises(CalibrationError, match="cannot load the tokenizer"):
        tokenizer_identity(path)


@pytest.mark.parametrize("case", list(CASES))
def test_the_identity_from_the_files_is_transformers_own(case, tmp_path):
    config, added, from_files = CASES[case]
    path = _folder(tmp_path / case, config, added)
    assert (_identity_from_files(path) is not None) == from_files
    assert tokenizer_identity(path) == tokenizer_identity(path, load_tokenizer(path))


def test_the_demo_tokenizer_is_read_from_its_files(demo_model):
    assert _identity_from_files(demo_model) is not None
    assert tokenizer_identity(demo_model) == tokenizer_identity(demo_model, load_tokenizer(demo_model))


def test_checking_a_calibration_set_does_not_import_transformers(demo_model, tmp_path):
    """A GPTQ run from a saved calibration set needs no tokenizer: its check reads the files."""
    code = (
        "import sys\n"
        "from solar_quant.calibration.artifact import CalibrationSet, check_tokenizer, tokenizer_identity\n"
        "import torch\n"
        f"path = {str(demo_model)!r}\n"
        "calib = CalibrationSet(torch.zeros(1, 4, dtype=torch.int64), {'tokenizer': tokenizer_identity(path)})\n"
        "check_tokenizer(calib, path)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.stdout.strip() == "[]", proc.stdout[-2000:]
