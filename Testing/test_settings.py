"""Settings declared once: their ranges judged in one place (settings.check) and the command line built
from the declarations."""

from __future__ import annotations

import json
import math
from dataclasses import fields

import pytest

from GaussianSVRLib.cli import parser, settings_from
from GaussianSVRLib.errors import InputError
from GaussianSVRLib.settings import PRESETS, Range, Settings, check, choices, options, preset, setting_type

REQUIRED = ["reconstruct", "--input-stacks", "s.nii.gz", "--output-volume", "v.nii.gz"]


def test_the_defaults_and_presets_are_valid_and_usual():
    for name in PRESETS:
        assert check(preset(name)) == [], name
    assert all(key in {f.name for f in fields(Settings)} for values in PRESETS.values() for key in values)


def test_every_default_lies_within_its_limits_and_every_setting_says_what_it_does():
    for name, spec in options().items():
        default = getattr(Settings(), name)
        assert len(spec.help) > 20, name
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert default in spec.limits and default in spec.plausible, name


def outside(limits: Range) -> list[float]:
    """Values just outside an interval's ends, and the non-finite ones."""
    values = [math.nan, math.inf]
    if limits.low is not None:
        values.append(limits.low if limits.low_open else limits.low - 1)
    if limits.high is not None:
        values.append(limits.high if limits.high_open else limits.high + 1)
    return values


@pytest.mark.parametrize("name", list(options()))
def test_values_outside_the_limits_are_refused_naming_the_flag(name):
    spec = options()[name]
    kind = setting_type(name)
    if choices(name):
        bad = ["bogus"]
    elif kind is bool:
        bad = [1, "yes"]
    elif kind is str:
        bad = [42]
    else:
        bad = [v for v in outside(spec.limits) if kind is float or not math.isfinite(v) or v == int(v)]
    for value in bad:
        with pytest.raises(InputError) as raised:
            check(Settings().updated(**{name: value}))
        assert raised.value.path == (spec.flag or name), raised.value


def test_unusual_values_warn_and_contradictions_are_refused():
    warnings = check(Settings().updated(output_resolution=8.0, k_neighbours=100))
    assert len(warnings) == 2 and "--output-resolution 8 mm is unusual" in warnings[1]
    with pytest.raises(InputError, match=f"fewer than the {Settings().k_neighbours}"):
        check(Settings().updated(n_gaussians=10))
    with pytest.raises(InputError, match="an integer"):
        check(Settings().updated(iterations=10.5))


def test_the_command_line_has_a_flag_for_every_flagged_setting_and_sets_that_field():
    reconstruct = next(
        a for a in parser()._subparsers._group_actions[0].choices.items() if a[0] == "reconstruct"
    )[1]
    flags = {action.dest: action for action in reconstruct._actions}
    defaults = Settings()
    for name, spec in options().items():
        if spec.flag is None:
            assert name not in flags, f"{name} has no flag in settings.py but one on the command line"
            continue
        assert flags[name].option_strings == [spec.flag] and flags[name].help.startswith(spec.help)
        kind = setting_type(name)
        if kind is bool:
            argv, expected = [spec.flag], not getattr(defaults, name)
        elif choices(name):
            expected = next(c for c in choices(name) if c != getattr(defaults, name))
            argv = [spec.flag, expected]
        elif kind is str:
            argv, expected = [spec.flag, "x.npz"], "x.npz"
        else:
            expected = kind(spec.limits.high if spec.limits.high is not None else 7)
            argv = [spec.flag, str(expected)]
        assert getattr(settings_from(parser().parse_args(REQUIRED + argv)), name) == expected, name
    assert settings_from(parser().parse_args(REQUIRED)) == preset("standard")
    assert settings_from(parser().parse_args(REQUIRED + ["--preset", "high"])) == preset("high")


def test_a_run_can_start_from_the_settings_of_a_report(tmp_path):
    earlier = preset("high").updated(seed=7, output_resolution=1.2)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"gaussiansvr_version": "x", "settings": earlier.as_dict()}))
    assert settings_from(parser().parse_args(REQUIRED + ["--settings", str(report)])) == earlier
    again = settings_from(parser().parse_args(REQUIRED + ["--settings", str(report), "--seed", "3"]))
    assert again == earlier.updated(seed=3)
    (tmp_path / "odd.json").write_text(json.dumps({"settings": {"iterations": 5, "speed": "max"}}))
    with pytest.raises(InputError, match="unknown: \\['speed'\\]"):
        settings_from(parser().parse_args(REQUIRED + ["--settings", str(tmp_path / "odd.json")]))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="cannot be read as JSON"):
        settings_from(parser().parse_args(REQUIRED + ["--settings", str(tmp_path / "broken.json")]))
