"""The method registry: names, building, parameter validation with errors that name what is allowed."""

import math

import pytest
import torch

import bench
import methods
from tests.helpers import small_vit

EXPECTED = sorted(["ats", "baseline", "evit", "pooling", "ppt", "pruning", "tome", "topk", "resize", "pitome", "tofu", "diffrate", "mctf", "dpcknn", "kmedoids", "static", "random"])


def test_names_lists_every_method():
    assert methods.names() == EXPECTED


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("baseline", {}, {}),
        ("tome", {"r": 13}, {"r": 13, "inflection": 0, "prop_attn": True}),
        ("tome", {"r": [4, 4, 2]}, {"r": [4, 4, 2], "inflection": 0, "prop_attn": True}),
        ("ppt", {"r": 50}, {"r": 50, "layers": [3, 6, 9], "threshold": 7e-5, "prop_attn": True}),
        ("ppt", {"r": 5, "threshold": "inf"}, {"r": 5, "layers": [3, 6, 9], "threshold": math.inf, "prop_attn": True}),
        ("pruning", {"r": 50}, {"r": 50, "layers": [3, 6, 9], "prop_attn": True}),
        ("pooling", {"r": 5, "layers": [1]}, {"r": 5, "layers": [1], "prop_attn": True}),
        ("evit", {"keep_rate": 0.5}, {"keep_rate": 0.5, "layers": [3, 6, 9]}),
        ("topk", {"keep_rate": 0.7, "layers": [2]}, {"keep_rate": 0.7, "layers": [2]}),
    ],
)
def test_build_fills_defaults(name, params, expected):
    method = methods.build(name, **params)
    assert method.name == name
    assert method.params == expected


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("tomee", {"r": 1}, "unknown method 'tomee'; allowed: " + ", ".join(EXPECTED)),
        ("tome", {"r": 1, "rr": 2}, "unknown parameter 'rr'; allowed: r, inflection, prop_attn"),
        ("baseline", {"r": 1}, "unknown parameter 'r'; allowed: none"),
        ("pruning", {"r": 1, "threshold": 1.0}, "unknown parameter 'threshold'; allowed: r, layers, prop_attn"),
        ("tome", {}, "missing required parameter 'r'"),
        ("tome", {"r": -1}, "'r' must be an integer >= 0, got -1"),
        ("tome", {"r": 2.5}, "'r' must be an integer >= 0, got 2.5"),
        ("tome", {"r": [1, 2], "inflection": -1}, "'inflection' is used only with an int r"),
        # ToMe's code reads a tuple as (r, inflection): (13, 0) was taken as the per-layer list [13, 0]
        ("tome", {"r": (13, 0)}, "'r' must be an int or a list of ints (one per block), got the tuple (13, 0)"),
        ("tome", {"r": (13, -1)}, "ToMe's (r, inflection) pair is written r: R, inflection: I"),
        ("tome", {"r": 3, "prop_attn": "yes"}, "'prop_attn' must be true or false"),
        ("ppt", {"r": 3, "threshold": -1}, "'threshold' must be a number >= 0"),
        # a quoted number is refused, as for every other number parameter
        ("ppt", {"r": 3, "threshold": "1.0e-3"}, "'threshold' must be a number >= 0 (or inf), got '1.0e-3'"),
        ("ppt", {"r": 3, "layers": []}, "'layers' must be a non-empty list"),
        ("ppt", {"r": 3, "layers": [2, 2]}, "repeated block index"),
        ("evit", {"keep_rate": 1.5}, "'keep_rate' must be a number in (0, 1], got 1.5"),
        ("evit", {"keep_rate": 0}, "'keep_rate' must be a number in (0, 1], got 0"),
    ],
)
def test_invalid_parameters_name_what_is_allowed(name, params, message):
    with pytest.raises(ValueError) as error:
        methods.build(name, **params)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("ppt", {"r": 4, "layers": [3, 12]}, "include block 12, but the model has 12 blocks (allowed: 0..11)"),
        ("evit", {"keep_rate": 0.5, "layers": [20]}, "include block 20"),
        ("tome", {"r": [1] * 13}, "r lists 13 layers, but the model has 12 blocks"),
    ],
)
def test_parameters_impossible_for_the_model(name, params, message):
    with pytest.raises(ValueError) as error:
        bench.apply(small_vit(), name, **params)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("tome", {"r": 64}, "r=64 would remove all 64 patch tokens"),
        ("tome", {"r": 40, "inflection": -1},
         "r=40 with inflection -1 merges 80 tokens at one block, which would remove all 64 patch tokens"),
        ("ppt", {"r": 80}, "r=80 would remove all 64 patch tokens"),
    ],
)
def test_budget_check_rejects_r_beyond_the_patch_count(name, params, message):
    model = bench.apply(small_vit(), name, **params)  # the harness caps, as the reference code does
    with pytest.raises(ValueError) as error:
        model.method.check_budget(model.context)
    assert message in str(error.value)


def test_apply_accepts_a_built_method_and_rejects_extra_params():
    vit = small_vit()
    model = bench.apply(vit, methods.build("tome", r=2))
    assert model.method.params["r"] == 2
    with pytest.raises(ValueError, match="already built method"):
        bench.apply(vit, methods.build("tome", r=2), r=3)


def test_apply_rejects_non_vit():
    import torch

    with pytest.raises(ValueError, match=r"needs a timm VisionTransformer \(ViT / DeiT / distilled DeiT\), got Linear$"):
        bench.apply(torch.nn.Linear(2, 2), "baseline")
    import timm

    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1)
    with pytest.raises(ValueError, match=r"got Eva \(eva02_tiny_patch14_224\)$"):  # which model: timm's name
        bench.apply(eva, "tome", r=1)


def test_forward_stats_before_forward_is_an_error():
    with pytest.raises(ValueError, match="has not run a forward pass"):
        bench.forward_stats(bench.apply(small_vit(), "baseline"))


@pytest.mark.parametrize(("source", "message"), [
    ("def broken(:\n", "error: methods/zz_new.py: SyntaxError: invalid syntax"),
    ("from methods.base import Method, register\n\n\n@register('tome')\nclass Again(Method):\n    pass\n",
     "error: methods/zz_new.py: ValueError: method name 'tome' registered twice (methods.tome, methods.zz_new)"),
])
def test_a_broken_method_file_is_one_line_exit_2(tmp_path, source, message):
    """Every file of methods/ is imported by the registry: one that does not import (a syntax error, a name
    registered twice) stops run_bench with one line naming it, not a traceback with exit 1."""
    import shutil
    import subprocess
    import sys

    from bench.pipeline.files import REPO

    shutil.copytree(REPO / "methods", tmp_path / "methods", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "methods" / "zz_new.py").write_text(source)
    script = (f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {str(REPO)!r}]; import run_bench; "
              f"sys.exit(run_bench.main(['--config', {str(REPO / 'configs' / 'quickstart.yaml')!r}, '--dry-run']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(message), line


def test_forward_stats_print_counts_and_tensor_shapes_not_tensors():
    model = bench.apply(small_vit(), "ppt", r=8, layers=[1, 3])
    model(torch.randn(2, 3, 64, 64))
    text = repr(bench.forward_stats(model))
    assert text.startswith("ForwardInfo(tokens_in=[65, 65, 57, 57, 49, 49") and "size=tensor(2, 49, 1)" in text
    assert "stats={1: {'pooled_fraction': " in text and len(text) < 1000, text


def test_params_labels_show_the_budget_knob_where_it_acts():
    from bench.pipeline.config import params_label

    def label(name, **params):
        return params_label(name, methods.build(name, **params).params)

    assert label("evit") == "keep_rate=0.7"  # the default, shown: the setting a reader compares first
    assert label("evit", layers=[1, 3]) == "keep_rate=0.7, layers=[1, 3]"
    assert label("tome", r=4) == "r=4"
    assert label("static") == ""  # contiguous: keep_rate does nothing there (user test 8)
    assert label("static", not_contiguous=True) == "keep_rate=0.7, not_contiguous=True"
    assert label("static", not_contiguous=True, keep_rate=0.75, layers=[1]) == \
        "keep_rate=0.75, layers=[1], not_contiguous=True"  # the knob first, as the README says
    assert label("baseline") == ""


def test_required_parameters_show_as_required():
    """``methods.parameters`` lists a parameter without a default as ``REQUIRED`` (it printed
    ``<object object at 0x...>``, user test 13)."""
    assert repr(methods.parameters("tome")) == "{'r': REQUIRED, 'inflection': 0, 'prop_attn': True}"
    assert repr(methods.parameters("ppt")["r"]) == "REQUIRED"
