"""Test helpers shared by the component test files."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


def randomize(module: nn.Module, seed: int, *, keep_scale: Callable[[str], bool] = lambda name: False,
              unit: Callable[[str], bool] = lambda name: False) -> nn.Module:
    """Every parameter away from its (partly zero) init, so every path counts: norm weights (and `unit` ones such as
    layer scales) 1 + noise, matrices ~ N(0, 1/fan-in) unless `keep_scale(name)` (position tables), the rest
    0.3 * noise. Seeded: the same module and seed give the same values."""
    gen = torch.Generator().manual_seed(seed)
    norms = {f"{name}.weight" for name, sub in module.named_modules() if "norm" in type(sub).__name__.lower()}
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name in norms or unit(name):
                p.copy_(1 + 0.2 * noise)
            elif p.dim() >= 2 and not keep_scale(name):
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.3 * noise)
    return module


# ---- one-line errors -------------------------------------------------------------------------------------------------
def one_line(info) -> str:
    """The message of a pytest.raises ExceptionInfo, asserted to be one line (what the CLI prints after `error:`)."""
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def cli_error(result, exit_code: int = 2) -> str:
    """The one `error: ...` line a click CliRunner result ended with (exit code 2, no traceback); returns it."""
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]
