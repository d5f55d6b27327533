"""Lazy, read-only access to a Hugging Face checkpoint folder, one tensor at a time.

Shapes and dtypes come from the safetensors headers alone; tensor data is read through
`safetensors.safe_open` (memory-mapped) only when asked for. Nothing here writes to the
source folder.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from solar_quant.checkpoint.headers import DTYPE_BYTES, HeaderEntry, read_header
from solar_quant.errors import CheckpointError, NumericsError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FLOAT_DTYPES = ("F16", "BF16", "F32")
READABLE_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")


@dataclass(frozen=True)
class TensorInfo:
    """Header facts about one tensor: where it lives and what it holds."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


class CheckpointReader:
    """A checkpoint folder (config.json + safetensors shards), opened read-only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or folder; pass a checkpoint folder holding config.json")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a folder; pass the checkpoint folder that holds config.json and the .safetensors files")
        self._handles: dict[str, object] = {}

    # -- config -----------------------------------------------------------------------
    @cached_property
    def config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{self.path}: no config.json; pass a Hugging Face checkpoint folder")
        try:
            doc = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg}: not valid JSON ({e}); restore the file from the original checkpoint") from None
        if not isinstance(doc, dict):
            raise CheckpointError(f"{cfg}: must hold a JSON object")
        return doc

    @property
    def quant_method(self) -> str | None:
        q = self.config.get("quantization_config")
        return q.get("quant_method") if isinstance(q, dict) else None

    def require_llama(self) -> None:
        """Raise unless config.json describes a Llama-family causal LM."""
        model_type = self.config.get("model_type")
        archs = self.config.get("architectures") or []
        if model_type != "llama" or (archs and "LlamaForCausalLM" not in archs):
            raise CheckpointError(
                f"{self.path / 'config.json'}: model_type={model_type!r} architectures={archs}; "
                "solar-quant supports Llama-family checkpoints (model_type 'llama', LlamaForCausalLM) only")

    def require_unquantized(self) -> None:
        if self.quant_method:
            raise CheckpointError(
                f"{self.path / 'config.json'}: already quantized (quant_method {self.quant_method!r}); "
                "pass the 16-bit source checkpoint instead")

    # -- tensors ----------------------------------------------------------------------
    @cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file name."""
        index = self.path / INDEX_NAME
        if index.is_file():
            return self._weight_map_from_index(index)
        single = self.path / SINGLE_NAME
        shards = [single] if single.is_file() else sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.path}: no {INDEX_NAME} and no .safetensors files; convert the checkpoint to safetensors first")
        return {name: s.name for s in shards for name in self._header(s.name)[0]}

    def _weight_map_from_index(self, index: Path) -> dict[str, str]:
        try:
            doc = json.loads(index.read_text())
            wmap = doc["weight_map"]
            if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid index (needs a 'weight_map' of tensor name to shard file)") from None
        for shard in sorted(set(wmap.values())):
            if "/" in shard or shard.startswith(".") or not (self.path / shard).is_file():
                raise CheckpointError(f"{index}: names shard '{shard}', which is not in {self.path}; restore the missing file")
        return wmap

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def _header(self, shard: str) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
        cache = self.__dict__.setdefault("_headers", {})
        if shard not in cache:
            cache[shard] = read_header(str(self.path / shard))
        return cache[shard]

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor's header facts, in weight-map order; reads headers only."""
        out = {}
        for name, shard in self.weight_map.items():
            entries, _ = self._header(shard)
            if name not in entries:
                raise CheckpointError(f"{self.path / shard}: the index names tensor '{name}' but the shard does not hold it")
            e = entries[name]
            out[name] = TensorInfo(name, e.dtype, e.shape, shard)
        return out

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor '{name}' is missing from the checkpoint") from None

    def get(self, name: str) -> "torch.Tensor":  # noqa: F821 - torch is imported lazily
        """Read one tensor (memory-mapped; callers copy or convert as they need)."""
        from safetensors import safe_open

        info = self.info(name)
        if info.dtype not in READABLE_DTYPES:
            raise CheckpointError(f"{self.path / info.shard}: tensor '{name}' has dtype {info.dtype}, which solar-quant cannot read")
        handle = self._handles.get(info.shard)
        try:
            if handle is None:
                handle = self._handles[info.shard] = safe_open(str(self.path / info.shard), framework="pt")
            return handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for corrupt data
            raise CheckpointError(f"{self.path / info.shard}: cannot read tensor '{name}' ({e}); the shard is corrupt") from None

    def require_weights(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Raise unless every tensor in `expected` (name -> shape, from config.json) is present as
        a 16/32-bit float tensor of that shape: checked from the headers, before any work starts."""
        for name, dims in expected.items():
            info = self.info(name)
            where = self.path / info.shard
            if tuple(info.shape) != tuple(dims):
                raise CheckpointError(f"{where}: tensor '{name}' has shape {list(info.shape)}, but "
                                      f"{self.path / 'config.json'} implies {list(dims)}; the config and weights disagree")
            if info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{where}: tensor '{name}' has dtype {info.dtype}; a 16-bit source holds "
                                      f"{'/'.join(FLOAT_DTYPES)} weights (re-export the checkpoint in float16)")

    def require_finite(self, name: str, tensor: "torch.Tensor") -> None:  # noqa: F821
        """Raise NumericsError naming the shard and tensor if `tensor` holds NaN or Inf."""
        if not tensor.is_floating_point() or tensor.numel() == 0:
            return
        import torch

        low, high = torch.aminmax(tensor)  # NaN propagates, Inf shows as an extreme: one pass, no mask
        if not (torch.isfinite(low) and torch.isfinite(high)):
            raise NumericsError(f"{self.path / self.info(name).shard}: tensor '{name}' holds NaN or Inf; "
                                "fix or re-export the source checkpoint (solar-quant will not quantize it)")

    def release(self) -> None:
        """Close the open shard handles. A handle keeps its whole shard memory-mapped, and every
        page read through it stays in this process's RSS; streaming callers release after each
        tensor so resident memory stays near one tensor instead of growing to the checkpoint."""
        self._handles.clear()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def file_bytes(self) -> int:
        return sum((self.path / s).stat().st_size for s in self.shards)

    # -- identity ---------------------------------------------------------------------
    def identity(self) -> dict:
        """A stable fingerprint of the source: sha256 of its manifest, index or headers, and config."""
        h = hashlib.sha256()
        for name in ("manifest.json", INDEX_NAME):
            p = self.path / name
            if p.is_file():
                basis = name
                h.update(p.read_bytes())
                break
        else:
            basis = "safetensors headers"
            for shard in self.shards:
                h.update(json.dumps({k: [e.dtype, e.shape, e.begin, e.end] for k, e in self._header(shard)[0].items()},
                                    sort_keys=True).encode())
        h.update((self.path / "config.json").read_bytes())
        # named, not located: records and reports carry no local path
        return {"name": self.path.resolve().name, "sha256": h.hexdigest(), "basis": f"{basis} + config.json"}
