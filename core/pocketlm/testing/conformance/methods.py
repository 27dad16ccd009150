"""The method checks: options, runs on every tiny architecture, loadability, determinism, masks,
``ignore``, allocations on the layer's device and CUDA against the CPU; ``MethodConformance``."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from pydantic import ValidationError
from torch import nn

from ... import atomic
from ...components import FEATURES, Method, Options, SizeEffect, unrepresented
from ...modules import get_module, matches, select_linears
from ...weights import get_mask, is_linear, linear_shape, linear_weight, set_mask
from .. import make_context
from ._shared import (ATOL, FAMILIES, ConformanceError, _component, _differences, _folder, _plugins, _pytest, _raise,
                      logits, nonfinite, state_hash, tensors, tiny, windows)


# --------------------------------------------------------------------------- options


def build_options(method: Method, options: Mapping[str, Any] | Options | None = None) -> Options:
    if isinstance(options, Options):
        return options
    try:
        return method.options(**dict(options or {}))
    except ValidationError as exc:
        raise ConformanceError(f"method {method.name!r}", [f"options {dict(options or {})} do not validate: {exc}"])


def check_options(name: str, options: Mapping[str, Any] | None = None, *, defaults_build: bool = True,
                  plugins=None) -> None:
    """The options model is closed, frozen, describes every option (``pocketlm methods`` prints
    the descriptions), has buildable defaults and survives the JSON round trip; ``effect`` and
    ``plan`` are well-formed."""
    plugins = _plugins(plugins)
    method: Method = _component(plugins, "methods", name)
    problems: list[str] = []
    cls = method.options
    config = cls.model_config
    if config.get("extra") != "forbid":
        problems.append(f"{cls.__name__} accepts unknown keys (model_config extra={config.get('extra')!r}); "
                        "subclass pocketlm.Options and do not change model_config['extra']")
    if not config.get("frozen"):
        problems.append(f"{cls.__name__} is not frozen; subclass pocketlm.Options and keep frozen=True")
    undescribed = [n for n, f in cls.model_fields.items() if not f.description]
    if undescribed:
        problems.append(f"{cls.__name__} has options without a description: {', '.join(undescribed)}; declare each "
                        "as Field(default, description=\"...\") (pocketlm methods prints it)")
    if defaults_build:
        try:
            cls()
        except ValidationError as exc:
            problems.append(f"{cls.__name__}() with the defaults does not validate ({exc.errors()[0]['msg']}); "
                            "give every option a default, or declare defaults_build = False with the reason "
                            "in your test if the user must choose")
    built = None
    try:
        built = cls(**dict(options or {}))
    except ValidationError as exc:
        problems.append(f"{cls.__name__}(**{dict(options or {})}) does not validate: {exc}")
    try:
        cls(**{**dict(options or {}), "definitely_not_an_option": 1})
        problems.append(f"{cls.__name__} accepted the unknown key 'definitely_not_an_option'")
    except ValidationError:
        pass
    if built is not None:
        field_name = next(iter(cls.model_fields), None)
        if field_name is not None:
            try:
                setattr(built, field_name, getattr(built, field_name))
                problems.append(f"{cls.__name__} instances can be changed after validation (set {field_name!r})")
            except (ValidationError, TypeError, AttributeError):
                pass
        try:
            again = cls.model_validate(built.model_dump(mode="json"))
            if again != built:
                problems.append(f"{cls.__name__} does not survive model_dump(mode='json') -> model_validate "
                                f"({built!r} became {again!r}); run folders store options as JSON")
        except ValidationError as exc:
            problems.append(f"{cls.__name__}: model_dump(mode='json') does not validate again: {exc}")
        try:
            cls.model_json_schema()
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{cls.__name__}.model_json_schema() fails ({type(exc).__name__}: {exc}); "
                            "`pocketlm schema` needs it")
        try:
            effect = method.effect(built)
            if not isinstance(effect, SizeEffect):
                problems.append(f"effect(options) returned {type(effect).__name__}, expected pocketlm.SizeEffect")
            elif not effect.features <= FEATURES:
                problems.append(f"effect features {sorted(effect.features)} are not among {', '.join(sorted(FEATURES))}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"effect(options) raised {type(exc).__name__}: {exc}")
    if method.plan is not None:
        from ...planner import PlanBudget

        try:
            # the budgets the planner hands plan(): none, a bits target, a size target
            proposals = [p for budget in (PlanBudget(), PlanBudget(target_bits=3.0), PlanBudget(target_size_mb=40.0))
                         for p in method.plan(budget)]
            for proposal in proposals:
                try:
                    # "default" marks a proposal for the default hybrid; it is not an option
                    cls(**{k: v for k, v in proposal.items() if k != "default"})
                except ValidationError as exc:
                    problems.append(f"plan proposes {proposal}, which does not validate: {exc.errors()[0]['msg']}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"plan(budget) raised {type(exc).__name__}: {exc} (the planner hands it a "
                            "pocketlm.planner.PlanBudget)")
    _raise(f"method {name!r} options", problems)


# ------------------------------------------------------------------------------ runs


@dataclass
class MethodRun:
    """A method run on a tiny model, with what the checks compare against."""

    method: Method
    options: Options
    family: str
    original: nn.Module          # an untouched copy of the model before the run
    model: nn.Module             # the result
    windows: torch.Tensor
    context: Any
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def run_method(name: str, options: Mapping[str, Any] | Options | None = None, family: str = "llama", *,
               model: nn.Module | None = None, ids: torch.Tensor | None = None, seed: int = 0,
               stage_dir: Path | None = None, tokenizer=None, plugins=None,
               check_inputs: bool = True) -> MethodRun:
    """Run method ``name`` on a tiny ``family`` model (or ``model``) through the ``compress``
    hook, as a pipeline stage would, with a teacher (a copy of the model) in the context.
    With ``check_inputs``, fail if the calibration windows or the teacher changed."""
    import time

    plugins = _plugins(plugins)
    method: Method = _component(plugins, "methods", name)
    built = build_options(method, options)
    model = tiny(family, seed=seed) if model is None else model
    ids = windows() if ids is None else ids
    original = copy.deepcopy(model)
    teacher = copy.deepcopy(model)
    ids_before = ids.clone()
    teacher_before = state_hash(teacher)
    context = make_context(ids, teacher=teacher, stage_dir=stage_dir, seed=seed, tokenizer=tokenizer,
                           plugins=plugins)
    torch.manual_seed(seed)
    start = time.perf_counter()
    result = plugins.hook.compress(model=model, method=method, options=built, context=context)
    seconds = time.perf_counter() - start
    if result is not None and not isinstance(result, nn.Module):
        raise ConformanceError(f"method {name!r} on {family}",
                               [f"compress returned {type(result).__name__}; return the model (or None)"])
    result = model if result is None else result
    result.eval()
    if check_inputs:
        problems = []
        if not torch.equal(ids, ids_before) or ids.dtype != ids_before.dtype:
            problems.append("it modified the calibration windows tensor it was handed (clone before changing it)")
        if state_hash(teacher) != teacher_before:
            problems.append("it modified the teacher (context.teacher() must never change): "
                            + "; ".join(_differences(tensors(copy.deepcopy(original)), tensors(teacher))))
        _raise(f"method {name!r} on {family}", problems)
    return MethodRun(method, built, family, original, result, ids, context, seconds)


def check_runs(name: str, options=None, family: str = "llama", *, expect_change: bool = True,
               plugins=None, **kwargs) -> MethodRun:
    """Runs on ``family``, leaves inputs and teacher alone, changes the model, stays finite."""
    run = run_method(name, options, family, plugins=plugins, **kwargs)
    problems = []
    bad = nonfinite(run.model, run.windows)
    if bad:
        problems.append(f"NaN or inf in {', '.join(bad[:6])}")
    if expect_change and state_hash(run.model) == state_hash(run.original):
        problems.append("the model is unchanged after the run (with these options); pass options that make "
                        "it do something, or declare expect_change = False with the reason")
    _raise(f"method {name!r} on {family}", problems)
    return run


def hf_represents(run: MethodRun, plugins=None) -> bool:
    """Whether the ``hf`` exporter can represent what ``run``'s method declares it produces."""
    features = run.method.effect(run.options).features
    return not unrepresented(features, _plugins(plugins).exporters["hf"].represents)


class _NotHeld(Exception):
    """The hf round trip does not apply to this result."""


def check_loadable(model: nn.Module, folder: Path | None = None, *, ids: torch.Tensor | None = None,
                   plugins=None, what: str = "the result", hf: bool = True) -> None:
    """``model`` survives the core checkpoint (same tensors, masks and logits) and, with ``hf``,
    the ``hf`` exporter (transformers reloads it, same logits). A method whose result holds a
    feature the ``hf`` exporter cannot represent (recipes refuse that export) passes
    ``hf=False``."""
    from transformers import AutoModelForCausalLM

    from ...checkpoint import load_checkpoint, save_checkpoint

    plugins = _plugins(plugins)
    ids = windows() if ids is None else ids
    problems: list[str] = []
    expected = logits(model, ids)
    with _folder(folder) as base:
        try:
            with atomic.folder(base / "checkpoint") as tmp:
                save_checkpoint(model, None, tmp)
            reloaded = load_checkpoint(base / "checkpoint").model
            diff = _differences(tensors(model), tensors(reloaded))
            if diff:
                problems.append("the core checkpoint does not reload the same tensors: " + "; ".join(diff))
            elif not torch.allclose(logits(reloaded, ids), expected, atol=ATOL, rtol=ATOL):
                problems.append("the core checkpoint reloads with different logits")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"save/load with the core checkpoint failed: {type(exc).__name__}: {exc}")
        try:
            if not hf:
                raise _NotHeld
            exporter = plugins.exporters["hf"]
            options = exporter.options()
            context = make_context(ids, plugins=plugins)
            hash_before = state_hash(model)
            with atomic.folder(base / "hf") as tmp:
                plugins.hook.export(model=model, exporter=exporter, options=options, path=tmp, context=context)
            if state_hash(model) != hash_before:
                problems.append("exporting with 'hf' changed the model")
            dense = AutoModelForCausalLM.from_pretrained(base / "hf", dtype=torch.float32)
            got = logits(dense, ids)
            if got.shape != expected.shape or not torch.allclose(got, expected, atol=ATOL, rtol=ATOL):
                delta = (got - expected).abs().max().item() if got.shape == expected.shape else "shape"
                problems.append(f"the hf export, reloaded with transformers, gives different logits (max |Δ| {delta})")
        except _NotHeld:
            pass
        except Exception as exc:  # noqa: BLE001
            problems.append(f"hf export and transformers reload failed: {type(exc).__name__}: {exc}")
    _raise(what, problems)


def check_allocations(name: str, options=None, family: str = "llama", *, plugins=None, **kwargs) -> None:
    """Every tensor the method makes lives on the device of what it works on.

    The run is repeated with PyTorch's default device set to ``meta`` (the model and the
    windows are built before, on the CPU). A factory call without ``device=``
    (``torch.zeros(n)``, ``torch.eye(n)``, ``nn.Linear(...)``) then makes a meta tensor, which
    fails as soon as it meets a CPU tensor or leaves meta tensors in the result; on a GPU it would
    have been a CPU tensor meeting a CUDA one. Both runs must give identical tensors."""
    expected = run_method(name, options, family, plugins=plugins, check_inputs=False, **kwargs).model
    model, ids = tiny(family, seed=kwargs.pop("seed", 0)), kwargs.pop("ids", None)
    ids = windows() if ids is None else ids
    plugins = _plugins(plugins)
    try:
        with torch.device("meta"):
            got = run_method(name, options, family, model=model, ids=ids, plugins=plugins, check_inputs=False,
                             **kwargs).model
    except Exception as exc:  # noqa: BLE001
        _raise(f"method {name!r} on {family} makes a tensor without device= (with the default device set to "
               "meta, the run failed)", [f"{type(exc).__name__}: {str(exc)[:300]}"])
    on_meta = [n for n, t in tensors(got).items() if t.is_meta]
    if on_meta:
        _raise(f"method {name!r} on {family} makes tensors without device=",
               [f"{', '.join(on_meta[:6])} ended on the default device instead of the layer's"])
    _raise(f"method {name!r} on {family}: the run with the default device set to meta differs",
           _differences(tensors(expected), tensors(got)))


#: CPU against CUDA: the largest difference of a float tensor, relative to its largest value,
#: and the share of integer grid entries that may differ (a rounding decision flipped by a
#: different summation order moves one step, and error feedback may carry it on).
CUDA_TOLERANCE = {"relative": 2e-2, "grid_flips": 0.02}


def compare_devices(cpu: Mapping[str, torch.Tensor], cuda: Mapping[str, torch.Tensor]) -> list[str]:
    """Differences between the tensors of a CPU run and a CUDA run beyond ``CUDA_TOLERANCE``."""
    problems = []
    for name, expected in cpu.items():
        got = cuda.get(name)
        if got is None or got.shape != expected.shape:
            problems.append(f"{name}: missing or a different shape on CUDA")
            continue
        got = got.cpu()
        if expected.is_floating_point():
            scale = expected.float().abs().max().clamp(min=1e-6)
            relative = ((got.float() - expected.float()).abs().max() / scale).item()
            if relative > CUDA_TOLERANCE["relative"]:
                problems.append(f"{name}: max |CPU - CUDA| is {relative:.3g} of its largest value")
        elif expected.numel():
            flips = (got != expected).float().mean().item()
            if flips > CUDA_TOLERANCE["grid_flips"]:
                problems.append(f"{name}: {flips:.1%} of the entries differ")
    return problems


def check_cuda_matches_cpu(name: str, options=None, family: str = "llama", *, plugins=None,
                           device: str = "cuda") -> None:
    """The method run on a model on ``device`` gives the CPU's result within ``CUDA_TOLERANCE``,
    and every tensor of the result stays on ``device``. Raises ``RuntimeError`` where there is
    no CUDA device (``MethodConformance`` skips instead)."""
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    plugins = _plugins(plugins)
    on_cpu = run_method(name, options, family, plugins=plugins, check_inputs=False).model
    on_cuda = run_method(name, options, family, model=tiny(family, seed=0).to(device), plugins=plugins,
                         check_inputs=False).model
    elsewhere = [n for n, t in tensors(on_cuda).items() if t.device.type != "cuda"]
    problems = [f"{', '.join(elsewhere[:6])} left the CUDA device"] if elsewhere else []
    problems += compare_devices(tensors(on_cpu), tensors(on_cuda))
    _raise(f"method {name!r} on {family}: CUDA differs from the CPU", problems)


def check_deterministic(name: str, options=None, family: str = "llama", *, plugins=None, **kwargs) -> None:
    """Two runs on identical models with the same seed give bitwise identical tensors."""
    first = run_method(name, options, family, plugins=plugins, check_inputs=False, **kwargs).model
    second = run_method(name, options, family, plugins=plugins, check_inputs=False, **kwargs).model
    diff = _differences(tensors(first), tensors(second))
    _raise(f"method {name!r} on {family} is not deterministic (same model, options and seed)", diff)


def mask_everything(model: nn.Module, fraction: float = 0.3, seed: int = 1234) -> dict[str, torch.Tensor]:
    """Give every decoder linear (not the head) a random mask pruning ``fraction`` of it, the
    way an earlier pruning stage would. Returns the masks by module name."""
    generator = torch.Generator().manual_seed(seed)
    given = {}
    for name, module in select_linears(model, ["*"], ["lm_head"]).items():
        mask = torch.rand(linear_shape(module), generator=generator) >= fraction
        set_mask(module, mask)
        given[name] = get_mask(module).clone()
    return given


def check_masks(name: str, options=None, family: str = "llama", *, plugins=None, **kwargs) -> None:
    """Weights an earlier stage masked stay exactly zero, and the masks stay recorded."""
    model = tiny(family)
    given = mask_everything(model)
    shapes = {n: linear_shape(m) for n, m in select_linears(model, ["*"], ["lm_head"]).items()}
    run = run_method(name, options, family, model=model, plugins=plugins, check_inputs=False, **kwargs)
    result = run.model
    linears = {n: m for n, m in result.named_modules() if n and is_linear(m)}
    same_structure = {n: linear_shape(m) for n, m in linears.items() if n in shapes} == shapes
    problems = []
    for module_name, module in linears.items():
        mask = get_mask(module)
        if mask is None:
            if same_structure and module_name in given:
                problems.append(f"{module_name}: the mask an earlier stage set is gone "
                                "(carry it with weights.transfer_mask(old, new) when replacing a module)")
            continue
        weight = linear_weight(module)
        if weight.shape != mask.shape:
            problems.append(f"{module_name}: mask {tuple(mask.shape)} no longer fits weight {tuple(weight.shape)}")
            continue
        leaked = int((weight[~mask] != 0).sum())
        if leaked:
            problems.append(f"{module_name}: {leaked} masked weights are no longer zero")
        if same_structure and module_name in given and bool((mask & ~given[module_name]).any()):
            problems.append(f"{module_name}: the mask now keeps weights an earlier stage pruned")
    if not same_structure and given and not any(get_mask(m) is not None for m in linears.values()):
        problems.append("no mask survived the run (masks of kept modules must be kept, sliced where "
                        "a dimension shrinks)")
    _raise(f"method {name!r} on {family} does not respect masks", problems)


def check_ignore(name: str, options=None, family: str = "llama", *, plugins=None, **kwargs) -> bool:
    """With an ``ignore`` option: linears it matches are left untouched. Returns False (and
    checks nothing) when the options have no ``ignore``."""
    plugins = _plugins(plugins)
    method: Method = _component(plugins, "methods", name)
    if "ignore" not in method.options.model_fields:
        return False
    given = dict(options.model_dump() if isinstance(options, Options) else (options or {}))
    base = build_options(method, given)
    model = tiny(family)
    arch = make_context(plugins=plugins).architecture(model)
    extra = f"{arch.layers}.0.{arch.sequential[0][0]}"
    ignore = list(base.ignore) + [extra]
    run = run_method(name, {**given, "ignore": ignore}, family, model=model, plugins=plugins,
                     check_inputs=False, **kwargs)
    problems = []
    for module_name, module in select_linears(run.original, ["*"], []).items():
        if not matches(module_name, ignore):
            continue
        try:
            now = get_module(run.model, module_name)
        except AttributeError:
            problems.append(f"{module_name} (ignored) is gone")
            continue
        if type(now) is not type(module):
            problems.append(f"{module_name} (ignored) was replaced by a {type(now).__name__}")
            continue
        diff = _differences(module.state_dict(), now.state_dict())
        if diff:
            problems.append(f"{module_name} (ignored) changed: " + "; ".join(diff))
    _raise(f"method {name!r} on {family} does not respect ignore={ignore}", problems)
    return True


def check_method(name: str, options: Mapping[str, Any] | None = None, *, families=FAMILIES,
                 unsupported: Mapping[str, str] | None = None, detail_families=("llama", "gpt2"),
                 defaults_build: bool = True, expect_change: bool = True, plugins=None,
                 folder: Path | None = None) -> dict[str, str]:
    """Every method check on every family (masks, ignore and determinism on
    ``detail_families``). Raises one :class:`ConformanceError` listing every failure;
    returns ``{check: "ok" | "skipped: reason"}``."""
    unsupported = dict(unsupported or {})
    outcome: dict[str, str] = {}
    failures: list[str] = []

    def attempt(label, fn, *args, **kw):
        try:
            fn(*args, **kw)
            outcome[label] = "ok"
        except ConformanceError as exc:
            outcome[label] = "failed"
            failures.append(f"[{label}] " + str(exc).replace("\n", "\n    "))
        except Exception as exc:  # noqa: BLE001
            outcome[label] = "failed"
            failures.append(f"[{label}] raised {type(exc).__name__}: {exc}")

    attempt("options", check_options, name, options, defaults_build=defaults_build, plugins=plugins)
    for family in families:
        if family in unsupported:
            outcome[f"runs[{family}]"] = f"skipped: {unsupported[family]}"
            continue

        def runs_and_loads(family=family):
            run = check_runs(name, options, family, expect_change=expect_change, plugins=plugins)
            check_loadable(run.model, folder / family if folder else None, ids=run.windows, plugins=plugins,
                           what=f"method {name!r} on {family}", hf=hf_represents(run, plugins))

        attempt(f"runs[{family}]", runs_and_loads)
        if family in detail_families:
            attempt(f"deterministic[{family}]", check_deterministic, name, options, family, plugins=plugins)
            attempt(f"masks[{family}]", check_masks, name, options, family, plugins=plugins)
            attempt(f"ignore[{family}]", check_ignore, name, options, family, plugins=plugins)
            if outcome[f"ignore[{family}]"] == "ok" and "ignore" not in _component(
                    _plugins(plugins), "methods", name).options.model_fields:
                outcome[f"ignore[{family}]"] = "skipped: the options have no 'ignore'"
    _raise(f"method {name!r} fails conformance", failures)
    return outcome


# ------------------------------------------------------------------------- pytest class


class MethodConformance:
    """Subclass as ``TestSomething`` and set ``method`` (and ``options``); pytest then runs
    each check as a test, per architecture.

    * ``options``: option values for the runs (small and fast);
    * ``architectures``: families to run on; ``detail_architectures``: where the mask,
      ignore and determinism checks run (GPT-2 covers the transposed Conv1D layout);
    * ``unsupported``: ``{family: reason}`` for families the method declares unsupported;
    * ``defaults_build``: set False (with a comment why) when the user must choose an option;
    * ``expect_change``: set False for a method that may legitimately leave a model as it is.
    """

    method: str = ""
    options: dict = {}
    architectures: tuple[str, ...] = FAMILIES
    detail_architectures: tuple[str, ...] = ("llama", "gpt2")
    unsupported: dict[str, str] = {}
    defaults_build: bool = True
    expect_change: bool = True
    #: Why the allocation check cannot run for this method (a library it calls makes CPU tensors
    #: without ``device=`` on purpose); empty: it runs.
    allocations_unchecked: str = ""

    def pytest_generate_tests(self, metafunc):
        if "family" in metafunc.fixturenames:
            if metafunc.function.__name__ == "test_runs_and_exports":
                families = list(self.architectures)
            else:
                families = [f for f in self.detail_architectures if f in self.architectures]
            metafunc.parametrize("family", families)

    def _supported(self, family):
        if family in self.unsupported:
            _pytest().skip(f"{self.method} does not support {family}: {self.unsupported[family]}")

    def test_options(self):
        check_options(self.method, self.options, defaults_build=self.defaults_build)

    def test_runs_and_exports(self, family, tmp_path):
        self._supported(family)
        run = check_runs(self.method, self.options, family, expect_change=self.expect_change)
        check_loadable(run.model, tmp_path, ids=run.windows, what=f"method {self.method!r} on {family}",
                       hf=hf_represents(run))

    def test_deterministic(self, family):
        self._supported(family)
        check_deterministic(self.method, self.options, family)

    def test_respects_masks(self, family):
        self._supported(family)
        check_masks(self.method, self.options, family)

    def test_respects_ignore(self, family):
        self._supported(family)
        if not check_ignore(self.method, self.options, family):
            _pytest().skip(f"{self.method}'s options have no 'ignore'")

    def test_allocates_on_the_layer_device(self, family):
        self._supported(family)
        if self.allocations_unchecked:
            _pytest().skip(self.allocations_unchecked)
        check_allocations(self.method, self.options, family)

    def test_cuda_matches_cpu(self, family):
        self._supported(family)
        if not torch.cuda.is_available():
            _pytest().skip("no CUDA device here: the CPU/CUDA comparison runs where there is one")
        check_cuda_matches_cpu(self.method, self.options, family)
