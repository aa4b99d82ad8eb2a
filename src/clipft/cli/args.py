"""Argument helpers shared by the command-line modules (`cli`, `cli_models`): integer ranges and the
argument groups every command spells the same way (config/--set, device, quiet)."""

from __future__ import annotations

import argparse

from ..config import _DEVICE, PRESETS, Config, ConfigError, _field_types, _sections, config_from_arg


# --------------------------------------------------------------------------- integer arguments

def int_range(lo: int, hi: int | None = None):
    """An argparse `type` for an integer in [lo, hi] (hi None = no upper bound): a bad value is a usage
    error naming the option, never a traceback from deep inside a command."""
    want = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {want}, got {value}")
        return value

    parse.__name__ = f"integer {want}"
    return parse


positive_int = int_range(1)
non_negative_int = int_range(0)
pixels = int_range(16, 4096)  # image sides, the range data.image_size / data.prepared_size accept


def device_name(text: str) -> str:
    """An argparse `type` for --device: the forms train.device accepts, checked at parse time (a typo such
    as `gpu` used to reach torch.device, after the model had loaded, as an unexpected RuntimeError)."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


device_name.__name__ = "device"

# Device nodes (and the driver's /proc entry) without which no CUDA device can exist on Linux: NVIDIA's
# driver, WSL2's GPU bridge and ROCm (which torch also calls "cuda").
GPU_NODES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")


def check_cuda_present(device: str | None, option: str = "--device") -> None:
    """A CUDA device asked for on a Linux machine with no GPU driver at all is refused before torch is
    imported (torch.cuda.is_available() costs seconds of import to give the same answer). Anything less
    certain (a driver but a CPU-only torch build, another OS) is left to runtime.resolve_device."""
    import os
    import sys
    if not device or not device.startswith("cuda") or not sys.platform.startswith("linux"):
        return
    if not any(os.path.exists(p) for p in GPU_NODES):
        raise ConfigError(f"device {device!r}: CUDA is not available on this machine (no GPU driver); run on the "
                          f"CPU instead ({'--set train.device=cpu' if option == 'train.device' else '--device cpu'})")


# --------------------------------------------------------------------------- shared argument groups

def _add_overrides(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """--set SECTION.KEY=VALUE (repeatable); leftover --section.key=value arguments join them in main."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help=help or "override one config value (repeatable); --section.key=value works too")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """--config FILE_OR_PRESET and --set: the config of commands that build one."""
    p.add_argument("--config", help=f"YAML config file, or a preset name ({', '.join(PRESETS)})")
    _add_overrides(p, "override one config value (repeatable); --section.key=value works too")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")


def _add_quiet(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--quiet", action="store_true", help=help or "no progress bars")


def _build_config(args: argparse.Namespace, base: Config | None = None) -> Config:
    """Preset/file then overrides (including bare --section.key=value arguments)."""
    overrides = list(args.overrides) + list(getattr(args, "extra_overrides", []))
    return config_from_arg(getattr(args, "config", None), overrides, base=base)


def _unrecognised(a: str, following: str | None, command: str | None) -> ConfigError:
    """The line for an argument no parser knows: `--lr 0.1` names the config key it probably meant
    (--set train.lr=0.1), anything else points at the command's --help."""
    name, _, value = a[2:].partition("=") if a.startswith("--") else ("", "", "")
    if not value and following is not None and not following.startswith("-"):
        value = following
    key = name.replace("-", "_")
    homes = [s for s, cls in _sections().items() if key and key in _field_types(cls)]
    homes.sort(key=lambda s: s != "train")  # batch_size is also text's and eval's: training's is the usual one
    where = f"clipft {command} --help" if command else "clipft --help"
    if len(homes) == 1:
        return ConfigError(f"unrecognised argument {a!r}: config values are set with --set SECTION.KEY=VALUE, "
                           f"e.g. --set {homes[0]}.{key}={value or 'VALUE'} (options: {where})")
    if homes:
        return ConfigError(f"unrecognised argument {a!r}: config values are set with --set SECTION.KEY=VALUE; "
                           f"{key} is a key of {', '.join(homes)} (e.g. --set {homes[0]}.{key}={value or 'VALUE'})")
    return ConfigError(f"unrecognised argument {a!r} (see {where})")


def _split_extra(extra: list[str], command: str | None = None) -> list[str]:
    """Turn leftover `--section.key=value` / `--section.key value` args into override strings."""
    out, i = [], 0
    while i < len(extra):
        a = extra[i]
        if not a.startswith("--") or "." not in a.split("=", 1)[0]:
            raise _unrecognised(a, extra[i + 1] if i + 1 < len(extra) else None, command)
        if "=" in a:
            out.append(a[2:])
            i += 1
        elif i + 1 < len(extra):
            out.append(f"{a[2:]}={extra[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"{a}: missing value")
    return out
