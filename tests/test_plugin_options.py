"""The plugin's options, ini keys and marker as a pytest user meets them."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFIG_PROBE = """
import json
import pytest

@pytest.mark.llem(batch_size=2, max_new_tokens=8, repeat=5)
def test_probe(llem):
    print("CONFIG=" + json.dumps(llem.config.model_dump(mode="json")))
"""


def _config(result: pytest.RunResult) -> dict:
    import json
    import re

    found = re.search(r"CONFIG=(\{.*\})", result.stdout.str())
    assert found, result.stdout.str()
    return json.loads(found.group(1))


def test_help_lists_every_option(pytester: pytest.Pytester):
    result = pytester.runpytest("--help")
    text = result.stdout.str()
    for option in (
        "--llem-backend",
        "--llem-model",
        "--llem-device",
        "--llem-meter",
        "--llem-repeat",
        "--llem-warmup",
        "--llem-report-dir",
        "--llem-set",
    ):
        assert option in text
    assert "llem_backend" in text  # the ini keys are listed too


def test_marker_is_registered(pytester: pytest.Pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["*@pytest.mark.llem(**params)*"])


def test_marker_then_ini_then_command_line(pytester: pytest.Pytester):
    pytester.makepyfile(CONFIG_PROBE)
    result = pytester.runpytest("-s")
    config = _config(result)
    assert (config["batch_size"], config["max_new_tokens"], config["repeat"]) == (2, 8, 5)

    pytester.makeini("[pytest]\nllem_repeat = 7\nllem_set =\n    batch_size=3\n")
    config = _config(pytester.runpytest("-s"))
    assert (config["batch_size"], config["repeat"]) == (3, 7)

    result = pytester.runpytest("-s", "--llem-repeat=2", "--llem-set", "batch_size=4")
    config = _config(result)
    assert (config["batch_size"], config["repeat"], config["max_new_tokens"]) == (4, 2, 8)


def test_llem_set_reaches_nested_parameters(pytester: pytest.Pytester):
    pytester.makepyfile(CONFIG_PROBE)
    result = pytester.runpytest(
        "-s",
        "--llem-set",
        "transformers.attn_implementation=sdpa",
        "--llem-set=temperature=0.5",
        "--llem-device=cpu",
    )
    config = _config(result)
    assert config["transformers"]["attn_implementation"] == "sdpa"
    assert config["sampling"]["temperature"] == 0.5
    assert config["sampling"]["do_sample"] is True
    assert config["device"] == "cpu"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--llem-set", "batch_sz=8"], "*--llem-set batch_sz=8*unknown parameter 'batch_sz'*"),
        (["--llem-set", "batch_size=0"], "*batch_size*greater than or equal to 1*"),
        (["--llem-set", "batch_size"], "*expected KEY=VALUE*"),
        (
            ["--llem-set", "transformers.attn_implementation=fast"],
            "*transformers.attn_implementation*'auto', 'eager', 'sdpa' or 'flash_attention_2'*",
        ),
        (["--llem-set", "sampling=wild"], "*sampling='wild'*'deterministic', 'standard'*"),
        (["--llem-backend=nope"], "*unknown backend 'nope'; choose from: transformers*"),
        (
            ["--llem-meter=nope"],
            "*unknown meter 'nope'; choose from: auto, nvml, rapl, zeus, codecarbon, none*",
        ),
        (["--llem-device=tpu"], "*--llem-device*'auto', 'cpu' or 'cuda'*"),
        (["--llem-repeat=0"], "*--llem-repeat*greater than or equal to 1*"),
    ],
)
def test_bad_options_are_usage_errors(pytester: pytest.Pytester, args, message):
    pytester.makepyfile(CONFIG_PROBE)
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_bad_ini_value_is_a_usage_error(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nllem_meter = watts\n")
    pytester.makepyfile(CONFIG_PROBE)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown meter 'watts'*"])


def test_marker_with_unknown_parameter_is_a_collection_error(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(batch_sz=4)
        def test_typo(llem):
            llem.run()

        def test_other():
            pass
        """
    )
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*ERROR collecting*", "*test_typo*batch_sz*unknown parameter*"])
    result.stdout.no_fnmatch_line("*Traceback*")


def test_marker_conflict_names_the_test(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(max_new_tokens=4, min_new_tokens=8)
        def test_conflict(llem):
            llem.run()
        """
    )
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        ["*test_conflict*min_new_tokens must not exceed max_new_tokens (min_new_tokens=8*"]
    )
    result.stdout.no_fnmatch_line("*During handling*")


def test_marker_positional_arguments_are_rejected(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(4)
        def test_positional(llem):
            llem.run()
        """
    )
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*test_positional*keyword parameters only*"])


def test_module_marker_and_function_marker_merge(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import json
        import pytest

        pytestmark = pytest.mark.llem(batch_size=2, num_prompts=4)

        @pytest.mark.llem(batch_size=4)
        def test_probe(llem):
            print("CONFIG=" + json.dumps(llem.config.model_dump(mode="json")))
        """
    )
    config = _config(pytester.runpytest("-s"))
    assert (config["batch_size"], config["num_prompts"]) == (4, 4)


def test_no_llem_tests_no_record(pytester: pytest.Pytester):
    pytester.makepyfile("def test_plain():\n    assert True\n")
    result = pytester.runpytest()
    assert result.ret == 0
    assert not (pytester.path / "reports").exists()
    result.stdout.no_fnmatch_line("*llem benchmark summary*")


@pytest.mark.parametrize("option", ["timeout-s", "baseline-s", "min-window-s"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e9", "-1"])
def test_seconds_options_refuse_infinite_and_absurd_values(
    pytester: pytest.Pytester, option: str, value: str
):
    pytester.makepyfile(CONFIG_PROBE)
    result = pytester.runpytest(f"--llem-{option}={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--llem-{option}: expected seconds, 0 <= N <= 604800 (7 days)*"])


def test_a_week_is_the_longest_seconds_option(pytester: pytest.Pytester):
    pytester.makepyfile(CONFIG_PROBE)
    result = pytester.runpytest("-s", "--llem-timeout-s=604800", "--llem-meter=none")
    assert result.ret != pytest.ExitCode.USAGE_ERROR
    result = pytester.runpytest("--llem-cooldown=seconds:inf")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--llem-cooldown: expected off, temperature or seconds:N*"])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("meter", "watts", "*ini option llem_meter: unknown meter 'watts'*"),
        ("isolation", "maybe", "*ini option llem_isolation: expected one of warn, skip, fail*"),
        ("cooldown", "lukewarm", "*ini option llem_cooldown: expected off, temperature*"),
        ("country", "France", "*ini option llem_country: expected a three-letter ISO code*"),
        ("gpus", "zero", "*ini option llem_gpus: 'zero' is not a GPU index*"),
        ("timeout_s", "inf", "*ini option llem_timeout_s: expected seconds*"),
        ("baseline_s", "-1", "*ini option llem_baseline_s: expected seconds*"),
        ("min_window_s", "soon", "*ini option llem_min_window_s: expected seconds*"),
        ("repeat", "0", "*ini option llem_repeat: *greater than or equal to 1*"),
    ],
)
def test_a_bad_ini_value_names_the_ini_key(
    pytester: pytest.Pytester, key: str, value: str, message: str
):
    pytester.makeini(f"[pytest]\nllem_{key} = {value}\n")
    pytester.makepyfile(CONFIG_PROBE)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    result.stderr.no_fnmatch_line(f"*--llem-{key.replace('_', '-')}*")


def test_the_command_line_value_is_the_one_named(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nllem_isolation = warn\n")
    pytester.makepyfile(CONFIG_PROBE)
    result = pytester.runpytest("--llem-isolation=maybe")
    result.stderr.fnmatch_lines(["*--llem-isolation: expected one of*got 'maybe'*"])


def test_unknown_parameter_hint_points_to_llem_params(pytester: pytest.Pytester):
    pytester.makepyfile(CONFIG_PROBE)
    result = pytester.runpytest("--llem-set", "batch_sz=8")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown parameter 'batch_sz'*(see `llem params`)*"])
