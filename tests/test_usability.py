"""What a user meets around the rewrite: the torch.compile route, logs, reports that stay true across
copies, option errors, SDPA's conventions in ``attend``, a module filter and an undo, packaging."""
from __future__ import annotations

import copy
import io
import json
import logging
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

import attnfuse
from attnfuse import logs
from attnfuse.report import EXCLUDED_BY_FILTER, FusionReport, GraphSites, SiteReport
from seed_modules import MegabyteStyle, PaddingStyle
from test_api import TinyBlock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _x():
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=600)


class _Records(logging.Handler):
    """The attnfuse log's records (pytest's logging plugin is off in CI, so no caplog)."""

    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "_Records":
        self.logger = logging.getLogger("attnfuse")
        self.level_before = self.logger.level
        self.logger.addHandler(self)
        self.logger.setLevel(self.level)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)

    def messages(self, level: int = logging.INFO) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


# ----------------------------------------------------------------------------- the torch.compile route

def test_compile_route_takes_optimize_options_and_reports_through_last_report():
    model = TinyBlock().eval()
    expected = model(_x())
    compiled = torch.compile(model, backend="attnfuse", options={"compiler": "eager", "verify": True})
    torch.testing.assert_close(compiled(_x()), expected)
    report = attnfuse.last_report()
    assert [(s.name, s.status) for s in report.sites] == [("model.attend", "fused")], str(report)
    torch.compile(PaddingStyle().eval(), backend="attnfuse", options={"compiler": "eager"})(
        *(torch.randn(1, 2, 4, 8) for _ in range(3)))
    assert report is attnfuse.last_report() and report.fused == 2  # every string-route graph since the reset
    torch._dynamo.reset()  # the compiled graphs are gone, and so is their report
    assert attnfuse.last_report() is None


def test_compile_route_refuses_unknown_options_listing_the_valid_ones():
    with pytest.raises(Exception, match=r"valid options are \['autotune', 'compiler'"):
        torch.compile(TinyBlock(), backend="attnfuse", options={"fast": True})(_x())
    with pytest.raises(TypeError, match="pass dynamic= to torch.compile"):
        attnfuse.backend(dynamic=True)


def test_backend_object_keeps_the_report_of_the_model_it_compiled():
    model = TinyBlock().eval()
    expected = model(_x())
    backend = attnfuse.backend(model, compiler="eager", kernels=["math"])
    assert backend.report.fused == 0
    torch.testing.assert_close(torch.compile(model, backend=backend)(_x()), expected)
    assert [(s.name, s.status, s.backend) for s in backend.report.sites] == [("TinyBlock.attend", "fused", "cpu-math")]
    assert attnfuse.last_report() is backend.report


def test_string_backend_registered_by_import_without_the_entry_point():
    """A source checkout has no installed entry point: ``import attnfuse`` must register the name."""
    hide_entry_points = (
        "import importlib.metadata as md\n"
        "real = md.entry_points\n"
        "md.entry_points = lambda **kw: md.EntryPoints([]) if kw.get('group') == 'torch_dynamo_backends' "
        "else real(**kw)\n")
    result = _run_python(hide_entry_points + (
        "import torch, attnfuse\n"
        "from attnfuse.capture import attnfuse_backend\n"
        "assert torch._dynamo.lookup_backend('attnfuse') is attnfuse_backend\n"
        "f = torch.compile(lambda x: x.softmax(-1), backend='attnfuse', options={'compiler': 'eager'})\n"
        "print(f(torch.ones(2, 2)).sum().item())\n"))
    assert result.returncode == 0 and result.stdout.strip() == "2.0", result.stderr[-2000:]


def test_entry_point_loaded_before_import_does_not_register_twice():
    result = _run_python("import torch\nfn = torch._dynamo.lookup_backend('attnfuse')\nimport attnfuse\n"
                         "assert torch._dynamo.lookup_backend('attnfuse') is fn\nprint('ok')\n")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_optimize_refuses_a_module_torch_compile_already_wrapped():
    model = TinyBlock()
    with pytest.raises(TypeError, match=r"_orig_mod.*backend='attnfuse'"):
        attnfuse.optimize(torch.compile(model))
    with pytest.raises(TypeError, match="_orig_mod"):
        attnfuse.audit(torch.compile(model), _x())
    assert model._compiled_call_impl is None


# ----------------------------------------------------------------------------- logs

def test_log_says_per_graph_what_was_fused_and_how_long_each_stage_took():
    with _Records() as log:
        attnfuse.optimize(TinyBlock(), verify=True)(_x())
    lines = log.messages()
    assert len(lines) == 1, lines
    assert "fused 1: TinyBlock.attend" in lines[0]
    for stage in ("Dynamo capture", "matching", "lowering", "verification"):
        assert f"{stage} " in lines[0] and " s" in lines[0], lines[0]


def test_a_slow_compile_gets_one_warning_line_per_model(monkeypatch):
    monkeypatch.setattr(logs, "SLOW_COMPILE_S", 0.0)
    model = attnfuse.optimize(TinyBlock())
    with _Records(logging.WARNING) as log:
        model(_x())
        model(_x())
        model(torch.randn(3, 7, 16))  # may recompile: the note is still written once
    warnings = log.messages(logging.WARNING)
    assert len(warnings) == 1 and "a call of TinyBlock took" in warnings[0] and "because it compiled" in warnings[0]


def test_a_fast_compile_writes_no_warning(monkeypatch):
    monkeypatch.setattr(logs, "SLOW_COMPILE_S", float("inf"))
    with _Records(logging.WARNING) as log:
        attnfuse.optimize(TinyBlock())(_x())
    assert log.messages(logging.WARNING) == []


def test_torch_logs_shows_the_attnfuse_log():
    code = ("import torch, attnfuse\nfrom test_api import TinyBlock\n"
            "attnfuse.optimize(TinyBlock())(torch.randn(1, 3, 16))\n"
            "from torch._logging._internal import log_registry\nassert log_registry.is_log('attnfuse')\n")
    result = _run_python(code, TORCH_LOGS="+attnfuse", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT}/tests")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "graph compiled: fused 1: TinyBlock.attend" in result.stderr, result.stderr[-2000:]


# ----------------------------------------------------------------------------- the report

def _reject_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def test_to_json_is_strict_json_whatever_the_features_hold():
    site = SiteReport("attn", "/x/model.py:3", "fused", features={
        "fill": float("-inf"), "nan": float("nan"), "scale": 0.125, "shape": (2, 1, 4), "dtype": torch.float16,
        "q_len": "L", 3: {"inner": float("inf")}})
    report = FusionReport(root="M", graphs=[GraphSites([site])])
    data = json.loads(report.to_json(), parse_constant=_reject_constant)
    features = data["sites"][0]["features"]
    assert features == {"fill": "-inf", "nan": "nan", "scale": 0.125, "shape": [2, 1, 4], "dtype": "torch.float16",
                        "q_len": "L", "3": {"inner": "inf"}}
    assert json.loads(report.to_json(indent=2), parse_constant=_reject_constant) == data


def test_report_of_a_real_model_round_trips_through_strict_json():
    model = attnfuse.optimize(PaddingStyle().eval())
    q, k, v = (torch.randn(2, 2, 4, 8) for _ in range(3))
    model(q, k, v, torch.rand(2, 4) > 0.3)
    data = json.loads(attnfuse.report(model).to_json(), parse_constant=_reject_constant)
    assert data["fused"] == 1 and data["sites"][0]["name"] == "PaddingStyle"


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copy_of_an_optimized_model_runs_the_original_and_its_report_says_so(how):
    model = attnfuse.optimize(TinyBlock().eval())
    model(_x())
    if how == "deepcopy":
        clone = copy.deepcopy(model)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(clone(_x()), model(_x()))
    copied = attnfuse.report(clone)
    assert copied.fused == 0 and copied.sites == [] and copied.not_optimized
    assert str(copied).startswith("attnfuse: not optimized:") and "attnfuse.optimize" in str(copied)
    assert copied.to_dict()["notes"][0].startswith("this module holds the report")
    assert attnfuse.report(model).fused == 1  # the original is untouched
    attnfuse.optimize(clone)(_x())
    assert attnfuse.report(clone).fused == 1 and attnfuse.report(clone).not_optimized is None


def test_state_dict_round_trips_leave_keys_and_the_report_true():
    model = attnfuse.optimize(TinyBlock().eval())
    model(_x())
    plain = TinyBlock().eval()
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict(), strict=True)  # an optimized model's checkpoint loads anywhere
    other = TinyBlock().eval()
    model.load_state_dict(other.state_dict(), strict=True)  # and new weights load into an optimized model
    torch.testing.assert_close(model(_x()), other(_x()))
    assert attnfuse.report(model).fused == 1 and attnfuse.report(model).not_optimized is None


# ----------------------------------------------------------------------------- restore and filter_fn

def test_restore_runs_the_original_forward_again():
    from torch._dynamo.utils import counters

    model = attnfuse.optimize(TinyBlock().eval())
    expected = model(_x())
    assert attnfuse.restore(model) is model
    frames = counters["frames"]["total"]
    torch.testing.assert_close(model(_x()), expected)
    assert counters["frames"]["total"] == frames  # Dynamo never saw the call
    assert model._compiled_call_impl is None
    with pytest.raises(ValueError, match="not passed to attnfuse.optimize"):
        attnfuse.report(model)
    assert attnfuse.restore(TinyBlock()) is not None  # a model never optimized: nothing to undo


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = TinyBlock(), TinyBlock()

    def forward(self, x):
        return self.decoder(self.encoder(x))


def test_filter_fn_leaves_sites_in_rejected_modules_alone_and_says_so():
    seen = []

    def only_encoder(module, name):
        seen.append((type(module).__name__, name))
        return not name.startswith("decoder")

    model = TwoBlocks().eval()
    expected = copy.deepcopy(model)(_x())
    attnfuse.optimize(model, filter_fn=only_encoder)
    torch.testing.assert_close(model(_x()), expected)
    sites = {s.name: (s.status, s.reason) for s in attnfuse.report(model).sites}
    assert sites == {"TwoBlocks.encoder.attend": ("fused", None),
                     "TwoBlocks.decoder.attend": ("skipped", EXCLUDED_BY_FILTER)}, sites
    assert ("MegabyteStyle", "decoder.attend") in seen and ("MegabyteStyle", "encoder.attend") in seen


def test_a_model_optimized_without_a_filter_is_not_affected_by_another_models_filter():
    filtered = attnfuse.optimize(TwoBlocks().eval(), filter_fn=lambda module, name: False)
    filtered(_x())
    plain = attnfuse.optimize(TwoBlocks().eval())
    plain(_x())
    assert attnfuse.report(filtered).fused == 0 and attnfuse.report(filtered).skipped == 2
    assert attnfuse.report(plain).fused == 2


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("options, message", [
    (dict(kernels=[]), r"kernels=\[\] allows no kernel.*'cudnn'"),
    (dict(kernels=["fastest"]), "choose from"),
    (dict(verify="yes"), "verify must be one of True, False"),
    (dict(autotune=1), "autotune must be one of True, False"),
    (dict(dynamic="auto"), "dynamic must be one of None, True, False"),
    (dict(compiler="tvm"), "compiler must be one of 'eager', 'inductor'"),
    (dict(compiler="inductor", mode="fast"), "mode must be one of None, 'default', 'reduce-overhead'"),
    (dict(mode="reduce-overhead"), "mode='reduce-overhead' is an Inductor mode; pass compiler='inductor'"),
])
def test_bad_option_values_name_the_valid_ones(options, message):
    model = TinyBlock()
    with pytest.raises(ValueError, match=message):
        attnfuse.optimize(model, **options)
    with pytest.raises(ValueError, match=message):
        attnfuse.Options(**options)
    assert model._compiled_call_impl is None


def test_options_object_is_accepted_and_keywords_replace_its_fields(monkeypatch):
    model = PaddingStyle().eval()
    attnfuse.optimize(model, attnfuse.Options(kernels="math", verify=True), verify=False)
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    model(q, k, v)
    assert attnfuse.report(model).sites[0].backend == "cpu-math"
    with pytest.raises(TypeError, match="must be an attnfuse.Options"):
        attnfuse.optimize(PaddingStyle(), options={"verify": True})
    assert attnfuse.Options(kernels="flash").kernels == ("flash",)


# ----------------------------------------------------------------------------- attend: SDPA's conventions

@st.composite
def _attention_inputs(draw):
    b, h, L, S, d = (draw(st.integers(1, n)) for n in (2, 3, 6, 6, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q, k, v = torch.randn(b, h, L, d, generator=g), torch.randn(b, h, S, d, generator=g), torch.randn(b, h, S, d, generator=g)
    shape = draw(st.sampled_from([(L, S), (b, 1, 1, S), (b, h, L, S), (1, h, L, 1)]))
    return q, k, v, shape, g


@given(_attention_inputs())
def test_float_mask_is_added_like_sdpa_attn_mask(case):
    q, k, v, shape, g = case
    mask = torch.randn(shape, generator=g)
    mask = mask.masked_fill(torch.rand(shape, generator=g) > 0.6, float("-inf"))
    mask[..., 0] = 0.0  # every row keeps a key (SDPA's kernels disagree on rows that keep none)
    torch.testing.assert_close(attnfuse.attend(q, k, v, mask=mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=2e-5, rtol=1e-4)
    bias = torch.randn(shape, generator=g)
    torch.testing.assert_close(attnfuse.attend(q, k, v, mask=mask, bias=bias),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask + bias), atol=2e-5, rtol=1e-4)


@given(_attention_inputs())
def test_bool_mask_keeps_and_causal_true_is_top_left_like_sdpa(case):
    q, k, v, shape, g = case
    keep = torch.rand(shape, generator=g) > 0.4
    keep[..., 0] = True
    torch.testing.assert_close(attnfuse.attend(q, k, v, mask=keep),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=keep), atol=2e-5, rtol=1e-4)
    if q.shape[-2] <= k.shape[-2]:  # every row keeps a key
        torch.testing.assert_close(attnfuse.attend(q, k, v, causal=True),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(attnfuse.attend(q, k, v, causal=False), F.scaled_dot_product_attention(q, k, v),
                               atol=2e-5, rtol=1e-4)


def test_attend_refuses_integer_masks_and_empty_kernel_lists_with_what_to_pass():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(TypeError, match="bool .True = attend. or floating point"):
        attnfuse.attend(q, q, q, mask=torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"kernels=\[\] allows no kernel"):
        attnfuse.attend(q, q, q, kernels=[])


# ----------------------------------------------------------------------------- packaging

def test_packaging_has_a_license_changelog_typed_marker_and_one_version():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    meta = project["project"]
    assert "version" not in meta and "version" in meta["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "attnfuse.__version__"}
    assert any(c.startswith("License :: OSI Approved :: Apache") for c in meta["classifiers"]) or \
        meta.get("license") == "Apache-2.0"
    assert "urls" not in meta  # no invented address: the public repository is not recorded in this checkout
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["attnfuse"]
    assert os.path.exists(os.path.join(ROOT, "attnfuse", "py.typed"))
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert "Apache License" in f.read(200)
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        assert f"## {attnfuse.__version__}" in f.read()


@pytest.mark.parametrize("route", ["string", "backend object", "optimize"])
def test_inductor_mode_reaches_inductor_as_its_config(monkeypatch, route):
    """``mode=`` from torch.compile (or attnfuse's options) becomes Inductor's config for that mode
    (``reduce-overhead``: CUDA graphs), as torch.compile gives it to its own Inductor backend."""
    import torch._inductor.compile_fx as inductor

    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        seen.append(config_patches)
        return gm.forward

    monkeypatch.setattr(inductor, "compile_fx", fake_compile_fx)
    torch._dynamo.reset()
    model = TinyBlock().eval()
    if route == "string":
        run = torch.compile(model, backend="attnfuse", mode="reduce-overhead")
    elif route == "backend object":
        run = torch.compile(model, backend=attnfuse.backend(), mode="reduce-overhead")
    else:
        run = attnfuse.optimize(model, compiler="inductor", mode="reduce-overhead")
    torch.testing.assert_close(run(_x()), model._call_impl(_x()))
    assert seen and all(patches == {"triton.cudagraphs": True} for patches in seen)


class _RowWithoutKeys(nn.Module):
    def forward(self, q, k, v, bias):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25 + bias, -1) @ v


def test_a_call_run_unfused_says_why_each_fused_kernel_refused_it():
    """A call no fused kernel computes exactly (gradients through a row whose every key a bias masks, on the CPU):
    the report names the unfused path and each kernel's reason, in its text and in ``to_dict``."""
    q, k, v = (torch.randn(1, 2, 4, 16, requires_grad=True) for _ in range(3))
    bias = torch.zeros(1, 1, 4, 4)
    bias[..., 0, :] = torch.finfo(torch.float32).min  # query row 0 keeps no key
    model = attnfuse.optimize(_RowWithoutKeys())
    model(q, k, v, bias).sum().backward()
    report = attnfuse.report(model)
    site = report.to_dict()["sites"][0]
    assert site["backend"].startswith("unfused"), str(report)
    assert "sdpa: a bias masks every key of a row" in site["features"]["unfused_because"], site
    assert "run unfused, as " in str(report)
