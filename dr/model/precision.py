"""Which number format an encoding forward runs in, and whether the hardware runs it natively.

- `cpu_has_native_bf16`: bf16 matmuls are native only with AVX-512 BF16 or AMX (x86) or the BF16
  extension (Arm); elsewhere PyTorch emulates them and bf16 is *slower* than float32.
- `parse_bf16`: the `--bf16` value: true | false | auto (`--bf16` alone, and YAML booleans, mean true).
- `choose_precision`: flags + device -> a `Precision` (dtype, how it is applied, and why), which `dr encode`
  logs and records in the config saved next to its output.

Two ways to apply a half-precision dtype (`--precision_mode`):
- ``weights`` casts the model once (`model.to(dtype)`): every matmul reads half-size weights and nothing is
  re-cast per batch; pooling and normalisation run in float32 on the cast-up hidden states;
- ``autocast`` keeps float32 weights and casts them inside every forward (`torch.autocast`): vectors a
  little closer to float32, at the cost of one weight copy per layer per batch.
torch is imported only where a device decision needs it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BF16_CHOICES = ("true", "false", "auto")
PRECISION_MODES = ("weights", "autocast")
# /proc/cpuinfo flags that mean bf16 dot products in hardware (x86: AVX-512 BF16, AMX; Arm: "bf16").
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
_TRUE = ("true", "yes", "1", "on", "y", "t")
_FALSE = ("false", "no", "0", "off", "n", "f")


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when this CPU computes bf16 matmuls in hardware (so bf16 is faster than float32).

    Reads the kernel's CPU flags (x86 ``flags``, Arm ``Features``); where there is no /proc/cpuinfo, asks
    torch's own CPU probe.
    """
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        import torch

        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return bool(_NATIVE_BF16_FLAGS & set(value.split()))
    return False


def parse_bf16(value: str | bool | None) -> str:
    """`--bf16` value -> "true" | "false" | "auto" (booleans and yes/no/1/0 spellings accepted)."""
    if value is None or isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower()
    if text in _TRUE:
        return "true"
    if text in _FALSE:
        return "false"
    if text == "auto":
        return "auto"
    raise ValueError(f"--bf16 must be true, false or auto, got {value!r}")


@dataclass(frozen=True)
class Precision:
    """What the encoder computes in: `dtype` (float32 | bfloat16 | float16), `mode` (weights | autocast;
    "none" for float32) and `reason` (why, for the log and the saved config)."""

    dtype: str
    mode: str
    reason: str

    @property
    def half(self) -> bool:
        return self.dtype != "float32"

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def describe(self) -> str:
        how = {"weights": f"{self.dtype} weights", "autocast": f"{self.dtype} autocast"}.get(
            self.mode, "float32"
        )
        return f"{how} ({self.reason})"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _cuda_bf16() -> bool:
    import torch

    return bool(torch.cuda.is_bf16_supported())


def choose_precision(
    bf16: str,
    fp16: bool,
    mode: str,
    device_type: str,
    native_cpu_bf16: Callable[[], bool] | None = None,
    native_cuda_bf16: Callable[[], bool] | None = None,
) -> Precision:
    """The precision to encode in, from `--bf16` (true | false | auto), `--fp16` and `--precision_mode`.

    ``auto`` is bf16 where the device has it in hardware (a CUDA GPU that supports it, a CPU with
    AVX-512 BF16 / AMX / Arm BF16), else float32: on other CPUs bf16 is emulated and slower than float32.
    ``true`` is bf16 whatever the hardware (the user asked). fp16 needs CUDA. Raises ValueError for
    combinations that cannot run (the caller turns it into a usage error). The hardware probes default to
    `cpu_has_native_bf16` / torch's CUDA check, looked up when called.
    """
    if mode not in PRECISION_MODES:
        raise ValueError(f"--precision_mode must be one of {PRECISION_MODES}, got {mode!r}")
    if fp16 and bf16 != "false":
        raise ValueError("--fp16 and --bf16 are mutually exclusive")
    if fp16:
        if device_type != "cuda":
            raise ValueError("--fp16 needs a CUDA GPU; on CPU use --bf16 or leave both off (float32)")
        return Precision("float16", mode, "--fp16")
    if bf16 == "true":
        return Precision("bfloat16", mode, "--bf16")
    if bf16 == "auto":
        if device_type == "cuda":
            native, where = (native_cuda_bf16 or _cuda_bf16)(), "this GPU"
        else:
            native, where = (native_cpu_bf16 or cpu_has_native_bf16)(), "this CPU (avx512_bf16 / amx_bf16)"
        if native:
            return Precision("bfloat16", mode, f"--bf16 auto: {where} has native bf16")
        return Precision("float32", "none", f"--bf16 auto: {where} has no native bf16, so float32 is faster")
    return Precision("float32", "none", "no --bf16 / --fp16")


def cast_for_inference(model: Any, precision: Precision, device_type: str) -> tuple[Any, Any]:
    """(model, context to run each forward in): weights cast once (``weights``), or float32 weights and
    `torch.autocast` around each forward (``autocast``), or float32 as it is."""
    import torch

    if not precision.half:
        return model, nullcontext()
    if precision.mode == "weights":
        return model.to(precision.torch_dtype()), nullcontext()
    return model, torch.autocast(device_type, dtype=precision.torch_dtype())
