"""The one table of sampling settings: validation, the max_tokens policy, config traits."""

from __future__ import annotations

import math

import pytest
from traitlets import Float, HasTraits, Int, TraitError

from qwen_magic.sampling import (
    DEFAULT_MAX_TOKENS,
    SAMPLING_KEYS,
    SAMPLING_SETTINGS,
    SETTINGS,
    config_traits,
    default_max_tokens,
    setting,
    validate,
)

# Per setting, values its words ("allowed") admit and values they do not.
ALLOWED = {
    "temperature": ([0, 0.0, 0.7, 2, 10.5], [-0.01, -1]),
    "top_p": ([1, 0.01, 0.5, 1.0], [0, 0.0, 1.01, -0.5]),
    "top_k": ([-1, 0, 1, 50, 50.0], [-2, -100, 1.5]),
    "min_p": ([0, 0.0, 0.5, 1], [-0.1, 1.01]),
    "max_tokens": ([1, 512, 100_000, 3.0], [0, -1, 1.5]),
    "repetition_penalty": ([0.01, 1, 2.5], [0, -1]),
    "presence_penalty": ([-2, 0, 1.5, 2], [-2.01, 2.01]),
    "frequency_penalty": ([-2, 0, 2.0], [-3, 2.5]),
    "seed": ([0, 1, 2**63 - 1, 7.0], [-1, 2**63, 0.5]),
}


def test_every_setting_is_described() -> None:
    assert set(ALLOWED) == set(SAMPLING_SETTINGS)


@pytest.mark.parametrize("item", SETTINGS, ids=lambda item: item.name)
def test_each_rows_check_agrees_with_its_words(item) -> None:
    good, bad = ALLOWED[item.name]
    for value in good:
        assert validate({item.name: value}) == {item.name: value}
    for value in bad:
        with pytest.raises(ValueError, match=item.name) as raised:
            validate({item.name: value})
        assert "\n" not in str(raised.value)


@pytest.mark.parametrize("item", SETTINGS, ids=lambda item: item.name)
def test_what_the_panel_offers_is_allowed(item) -> None:
    for value in (item.minimum, item.maximum, item.neutral, item.minimum + item.step):
        assert item.check(value), (item.name, value)


@pytest.mark.parametrize("name", SAMPLING_SETTINGS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, True, False, "0.5", [1]])
def test_non_numbers_and_non_finite_numbers_are_refused(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{name} must be"):
        validate({name: value})


@pytest.mark.parametrize("name", ["top_k", "max_tokens", "seed"])
def test_whole_number_settings_refuse_fractions_and_become_ints(name: str) -> None:
    with pytest.raises(ValueError, match="whole number"):
        validate({name: 3.5})
    assert type(validate({name: 3.0})[name]) is int


def test_float_settings_keep_their_value() -> None:
    assert validate({"temperature": 1}) == {"temperature": 1}
    assert validate({"top_p": 0.25})["top_p"] == 0.25


def test_unknown_keys_are_a_type_error_that_names_them() -> None:
    with pytest.raises(TypeError, match="unknown sampling option 'temprature', 'x'"):
        validate({"temprature": 0.5, "x": 1, "top_p": 0.5})


def test_none_means_unset() -> None:
    assert validate({"temperature": None, "seed": None, "stop": None}) == {}
    assert validate({}) == {}


@pytest.mark.parametrize(
    ("stop", "normalised"),
    [("###", ["###"]), (["a", "b"], ["a", "b"]), (("x",), ["x"]), ([], [])],
)
def test_stop_strings_are_normalised_to_a_list(stop: object, normalised: list[str]) -> None:
    assert validate({"stop": stop}) == {"stop": normalised}


@pytest.mark.parametrize("stop", [5, [""], ["a", 1], {"a": 1}, b"x"])
def test_bad_stop_strings_are_one_value_error(stop: object) -> None:
    with pytest.raises(ValueError, match="stop must be a string or a list of non-empty strings"):
        validate({"stop": stop})


def test_ignore_eos_must_be_a_bool() -> None:
    assert validate({"ignore_eos": True}) == {"ignore_eos": True}
    with pytest.raises(ValueError, match="ignore_eos must be True or False"):
        validate({"ignore_eos": 1})


def test_request_keys_are_the_settings_plus_stop_and_ignore_eos() -> None:
    assert (*SAMPLING_SETTINGS, "stop", "ignore_eos") == SAMPLING_KEYS
    assert setting("top_p").flag == "--top-p"
    assert setting("temperature").short_flag == "-t"
    with pytest.raises(KeyError, match="no sampling setting 'n'"):
        setting("n")


@pytest.mark.parametrize(
    ("max_model_len", "expected"),
    [(32_768, 512), (4096, 512), (2048, 512), (2047, 511), (512, 128), (8, 2), (3, 1), (0, 1)],
)
def test_default_max_tokens_is_512_but_at_most_a_quarter(max_model_len: int, expected: int) -> None:
    assert default_max_tokens(max_model_len) == expected
    assert default_max_tokens(max_model_len) <= max(1, max_model_len // 4)
    assert DEFAULT_MAX_TOKENS == 512


def test_config_traits_are_one_allow_none_trait_per_setting() -> None:
    traits = config_traits()
    assert list(traits) == list(SAMPLING_SETTINGS)
    for item in SETTINGS:
        trait = traits[item.name]
        assert isinstance(trait, Float if item.kind == "float" else Int), item.name
        assert trait.allow_none and trait.default_value is None
        assert trait.metadata.get("config") is True
        assert trait.help == item.help

    settings = type("Settings", (HasTraits,), config_traits())()
    assert settings.temperature is None  # unset: the model's own default
    settings.temperature = 0.3
    settings.max_tokens = 64
    with pytest.raises(TraitError):
        settings.max_tokens = 1.5
