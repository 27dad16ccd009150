"""The grid-rule checks: what a registered :class:`pocketlm.GridRule`'s ``fit`` must return, at
every setting (bits, group size, symmetric) the rule supports; ``GridRuleConformance``.

The contract (``pocketlm.GridRule``, ``pocketlm.quant``): ``fit(W, bits, group_size, symmetric,
importance=None) -> (scales, zeros)`` is a pure function of ``W`` (``[rows, cols]`` float32);
``scales`` are float32 holding positive, finite float16 values and ``zeros`` integer values,
both ``[rows, groups]`` (a last group shorter than ``group_size`` covers the remaining columns),
for the grid ``w = (q - zero) * scale`` with ``q`` in ``[0, 2**bits - 1]``; a symmetric grid's
zero point is ``2**(bits-1)``; every tensor it makes lives on ``W``'s device; a rule that does
not declare ``uses_importance`` ignores ``importance``.
"""

from __future__ import annotations

from typing import get_args

import torch

from ...components import GridRule
from ...quant import GROUP_SIZES, QuantScheme, dequantize_grid, round_to_grid
from ...weights import n_groups
from ._shared import ConformanceError, _component, _plugins, _raise

#: The weight a rule is fitted to: random rows (one of them all zero, as a pruned row is) ...
ROWS, COLS = 64, 64
#: ... and a second width whose last group is short for group sizes that do not divide it.
SHORT_COLS = 80
#: A rule's squared rounding error may be at most this many times min-max's. A sanity bound, not
#: a quality target: a rule that keeps min-max among its candidates stays at or below 1, a
#: scale off by a factor (a bits or group mix-up) lands far above.
ERROR_RATIO = 4.0
#: The share of weights an earlier stage pruned in the mask check.
MASKED = 0.3


def all_settings() -> list[tuple[int, int, bool]]:
    """Every ``(bits, group_size, symmetric)`` a :class:`pocketlm.quant.QuantScheme` accepts."""
    bits = get_args(QuantScheme.model_fields["bits"].annotation)
    return [(b, g, s) for b in bits for g in GROUP_SIZES for s in (True, False)]


def supported_settings(rule: GridRule) -> list[tuple[int, int, bool]]:
    """The settings of :func:`all_settings` that ``rule`` declares it fits."""
    return [setting for setting in all_settings() if not rule.problems(*setting)]


def grid_weight(rows: int = ROWS, cols: int = COLS, *, seed: int = 0, device="cpu") -> torch.Tensor:
    """A random ``[rows, cols]`` float32 weight with heavy tails, an outlier, and row 0 all zero."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * (0.02 + torch.rand(1, cols, generator=generator) * 0.05)
    weight[1, 3] = 0.5
    weight[0] = 0.0
    return weight.to(device)


def grid_importance(cols: int = COLS, *, seed: int = 1, device="cpu") -> torch.Tensor:
    """A ``[cols]`` importance vector with a few loud input channels."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(cols, generator=generator) ** 6 * 100 + 0.01).to(device)


def _setting(bits: int, group_size: int, symmetric: bool) -> str:
    return f"bits={bits}, group_size={group_size}, symmetric={symmetric}"


def _fit(rule: GridRule, W: torch.Tensor, bits: int, group_size: int, symmetric: bool, importance=None):
    result = rule.fit(W, bits, group_size, symmetric, importance)
    if not (isinstance(result, tuple) and len(result) == 2
            and all(isinstance(t, torch.Tensor) for t in result)):
        raise ConformanceError(f"grid rule {rule.name!r} at {_setting(bits, group_size, symmetric)}",
                               [f"fit returned {type(result).__name__}; expected a tuple (scales, zeros) of tensors"])
    return result


def grid_problems(scales: torch.Tensor, zeros: torch.Tensor, W: torch.Tensor, bits: int, group_size: int,
                  symmetric: bool) -> list[str]:
    """What is wrong with ``(scales, zeros)`` as the grid of ``W`` at these settings."""
    expected = (W.shape[0], n_groups(W.shape[1], group_size))
    problems = []
    for what, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != expected:
            problems.append(f"{what} of a {tuple(W.shape)} weight are {tuple(t.shape)}; expected [rows, groups] "
                            f"{expected} (a last group shorter than group_size covers the remaining columns)")
        if t.device != W.device:
            problems.append(f"{what} are on {t.device}, the weight on {W.device}")
    if problems:
        return problems
    if scales.dtype != torch.float32:
        problems.append(f"scales are {scales.dtype}; expected float32 (holding float16 values)")
    if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
        problems.append("some scales are zero, negative or not finite (row 0 of the weight is all zero: "
                        "give it a positive scale, as weights.to_scale_dtype does)")
    elif not torch.equal(scales.half().float(), scales.float()):
        problems.append("scales are not float16 values (round them with pocketlm.weights.to_scale_dtype)")
    if not bool(torch.isfinite(zeros).all()) or not torch.equal(zeros.round(), zeros):
        problems.append("zero points are not integers")
    elif bool(((zeros < 0) | (zeros > 2**bits - 1)).any()):
        problems.append(f"zero points leave [0, {2**bits - 1}]: a pruned weight, pinned to its zero point, "
                        "would not dequantize to 0")
    if symmetric and not bool((zeros == 2 ** (bits - 1)).all()):
        problems.append(f"a symmetric grid's zero point must be 2**(bits-1) = {2 ** (bits - 1)}")
    return problems


def squared_error(W: torch.Tensor, bits: int, group_size: int, symmetric: bool, fit=None,
                  mask: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """The squared round-trip error of ``W`` on the grid ``fit`` gives (None: min-max), and the
    dequantized weight."""
    q, scales, zeros = round_to_grid(W, bits, group_size, symmetric, mask=mask, fit=fit)
    back = dequantize_grid(q, scales, zeros, group_size)
    return float((back - W).pow(2).sum()), back


def check_grid_fit(name: str, bits: int, group_size: int, symmetric: bool, *, plugins=None,
                   max_error_ratio: float = ERROR_RATIO, cols: int = COLS) -> None:
    """Grid rule ``name`` at one setting: the grid's shape, dtype, device, float16 scales and
    integer zero points in range (symmetric: ``2**(bits-1)``) on a ``64 x cols`` and a ``64x80``
    weight; ``W`` and ``importance`` untouched; the same grid twice; ``importance`` ignored unless
    the rule declares ``uses_importance``; pruned weights dequantize to exactly 0; the squared
    round-trip error at most ``max_error_ratio`` times min-max's."""
    rule: GridRule = _component(_plugins(plugins), "grid_rules", name)
    what = f"grid rule {name!r} at {_setting(bits, group_size, symmetric)}"
    refused = rule.problems(bits, group_size, symmetric)
    _raise(what, [f"the rule declares it cannot fit these settings: it needs {', '.join(refused)}"] if refused else [])
    problems: list[str] = []
    W, importance = grid_weight(cols=cols), grid_importance(cols)
    W_before, importance_before = W.clone(), importance.clone()
    scales, zeros = _fit(rule, W, bits, group_size, symmetric, importance)
    problems += grid_problems(scales, zeros, W, bits, group_size, symmetric)
    if not torch.equal(W, W_before) or not torch.equal(importance, importance_before):
        problems.append("fit modified the weight or the importance it was handed (clone before changing them)")
    again = _fit(rule, W.clone(), bits, group_size, symmetric, importance.clone())
    if not (torch.equal(again[0], scales) and torch.equal(again[1], zeros)):
        problems.append("two fits of the same weight gave different grids (not deterministic)")
    plain = _fit(rule, W, bits, group_size, symmetric, None)
    problems += [f"without importance: {p}" for p in grid_problems(*plain, W, bits, group_size, symmetric)]
    if not rule.uses_importance and not (torch.equal(plain[0], scales) and torch.equal(plain[1], zeros)):
        problems.append("importance changed the grid, but the rule does not declare uses_importance=True")
    short = grid_weight(cols=SHORT_COLS, seed=2)
    problems += [f"on a {tuple(short.shape)} weight: {p}"
                 for p in grid_problems(*_fit(rule, short, bits, group_size, symmetric), short, bits, group_size,
                                        symmetric)]
    _raise(what, problems)
    fitted = lambda *args: plain  # noqa: E731  (the grid fitted above, rounded as a quantizer does)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) >= MASKED
    _, back = squared_error(W, bits, group_size, symmetric, fitted, mask)
    if bool((back[~mask] != 0).any()):
        problems.append("weights pinned to the zero point (pruned) do not dequantize to exactly 0")
    error, _ = squared_error(W, bits, group_size, symmetric, fitted)
    baseline, _ = squared_error(W, bits, group_size, symmetric)
    if not error <= max_error_ratio * baseline:
        problems.append(f"the squared round-trip error {error:.4g} is {error / baseline:.3g} times min-max's "
                        f"{baseline:.4g} (at most {max_error_ratio} allowed)")
    _raise(what, problems)


def check_grid_allocations(name: str, bits: int, group_size: int, symmetric: bool, *, plugins=None,
                           cols: int = COLS) -> None:
    """Every tensor ``fit`` makes lives on the weight's device: fitted again with PyTorch's default
    device set to ``meta`` (the weight made before, on the CPU), a tensor made without
    ``device=`` breaks the fit or the grid, so both fits must give identical grids."""
    rule: GridRule = _component(_plugins(plugins), "grid_rules", name)
    what = f"grid rule {name!r} at {_setting(bits, group_size, symmetric)}"
    W, importance = grid_weight(cols=cols), grid_importance(cols)
    expected = _fit(rule, W, bits, group_size, symmetric, importance)
    try:
        with torch.device("meta"):
            got = _fit(rule, W, bits, group_size, symmetric, importance)
    except ConformanceError:
        raise
    except Exception as exc:  # noqa: BLE001
        _raise(f"{what} makes a tensor without device= (with the default device set to meta, the fit failed)",
               [f"{type(exc).__name__}: {str(exc)[:300]}"])
    problems = [f"{part} ended on {t.device}, not the weight's device" for part, t in zip(("scales", "zeros"), got)
                if t.device != W.device]
    if not problems and not (torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])):
        problems.append("the fit with the default device set to meta gave another grid")
    _raise(what, problems)


def check_grid_rule(name: str, settings=None, *, plugins=None, max_error_ratio: float = ERROR_RATIO,
                    cols: int = COLS) -> dict[str, str]:
    """:func:`check_grid_fit` and :func:`check_grid_allocations` at every setting in ``settings``
    (None: every setting the rule supports). Raises one :class:`ConformanceError` listing every
    failure; returns ``{setting: "ok"}``."""
    plugins = _plugins(plugins)
    rule: GridRule = _component(plugins, "grid_rules", name)
    outcome, failures = {}, []
    for setting in settings or supported_settings(rule):
        label = _setting(*setting)
        try:
            check_grid_fit(name, *setting, plugins=plugins, max_error_ratio=max_error_ratio, cols=cols)
            check_grid_allocations(name, *setting, plugins=plugins, cols=cols)
            outcome[label] = "ok"
        except ConformanceError as exc:
            outcome[label] = "failed"
            failures.append(str(exc).replace("\n", "\n    "))
    _raise(f"grid rule {name!r} fails conformance", failures)
    return outcome


def _setting_id(setting) -> str:
    bits, group_size, symmetric = setting
    return f"{bits}bit-g{group_size}-{'sym' if symmetric else 'asym'}"


class GridRuleConformance:
    """Subclass as ``TestSomething`` and set ``grid_rule``; pytest then checks the rule at every
    setting it supports (each a test).

    * ``settings``: ``(bits, group_size, symmetric)`` tuples to check instead (empty: every
      setting the rule supports, from its ``bits``, ``group_sizes`` and ``symmetric``);
    * ``max_error_ratio``: the largest squared round-trip error allowed, as a multiple of
      min-max's (raise it, with the reason, for a rule that trades error for a format);
    * ``cols``: the width of the weight (64; a rule with a layout of its own, such as 256-weight
      super-blocks, sets a width that exercises it).
    """

    grid_rule: str = ""
    settings: tuple[tuple[int, int, bool], ...] = ()
    max_error_ratio: float = ERROR_RATIO
    cols: int = COLS

    def pytest_generate_tests(self, metafunc):
        if "setting" in metafunc.fixturenames:
            settings = list(self.settings)
            if not settings:
                rule = _plugins(None).grid_rules.get(self.grid_rule)
                # an unregistered rule: every test fails with the installed names (not a collection error)
                settings = supported_settings(rule) if rule is not None else all_settings()[:1]
            metafunc.parametrize("setting", settings, ids=[_setting_id(s) for s in settings])

    def test_fit_contract(self, setting):
        check_grid_fit(self.grid_rule, *setting, max_error_ratio=self.max_error_ratio, cols=self.cols)

    def test_allocates_on_the_weight_device(self, setting):
        check_grid_allocations(self.grid_rule, *setting, cols=self.cols)
