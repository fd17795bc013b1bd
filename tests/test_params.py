"""params.yaml is read in one place: a product's section is checked once and resolved into typed settings."""

from __future__ import annotations

import pytest

from components.params import ProductSettings, product_section
from tfanet_core.errors import ConfigError


def test_a_products_section_resolves_its_category_and_config() -> None:
    settings = ProductSettings.of("line7", {"profile": "tiny", "data": {"category": "fabric"}, "train": {"epochs": 3}})
    assert (settings.product, settings.category) == ("line7", "fabric")
    assert settings.config.profile == "tiny" and settings.config.train.epochs == 3
    assert ProductSettings.of("bracket", {"profile": "tiny"}).category == "bracket"  # default: the product's name


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"profile": "tiny", "traning": {"epochs": 3}}, r"unknown key\(s\) \['traning'\] in params.yaml products.p"),
        (
            {"profile": "tiny", "data": {"categroy": "x"}},
            r"unknown key\(s\) \['categroy'\] in params.yaml products.p.data",
        ),
        ({"profile": "tiny", "train": {"epoch": 3}}, r"unknown key\(s\) \['epoch'\] in config section 'train'"),
        ({"profile": "huge"}, "unknown profile 'huge'"),
    ],
)
def test_a_misspelt_setting_is_refused_once_naming_the_known_ones(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ProductSettings.of("p", section)


def test_an_unknown_product_says_which_exist() -> None:
    with pytest.raises(ConfigError, match=r"product 'x' is not in params.yaml \(products: \['a', 'b'\]\)"):
        product_section({"products": {"a": {}, "b": {}}}, "x")
