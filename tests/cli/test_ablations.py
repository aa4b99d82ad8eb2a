"""clipft.cli.ablations: the named configurations, a user's YAML file of more, and the selection of a
study, checked without torch."""
import pytest

from clipft.cli import ablations
from clipft.cli.ablations import ABLATIONS, AblationError
from clipft.config import ConfigError


def test_select_configs_puts_baseline_first_and_rejects_unknown():
    assert list(ablations.select_configs(["dropout"])) == ["baseline", "dropout"]
    assert list(ablations.select_configs(None, quick=True)) == list(ablations.QUICK_CONFIGS)
    assert list(ablations.select_configs(None)) == list(ABLATIONS)
    with pytest.raises(AblationError, match="'nope'"):
        ablations.select_configs(["nope"])


def test_user_configs_file(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("wide:\n  model: {head_hidden: 64}\nwide_bn:\n  model: {head_hidden: 64, head_norm: batchnorm}\n")
    user = ablations.load_ablations_file(f)
    assert user["wide_bn"] == {"model": {"head_hidden": 64, "head_norm": "batchnorm"}}
    assert list(ablations.select_configs(["wide_bn"], user)) == ["baseline", "wide_bn"]
    for text, match in [("x:\n  model: {nope: 1}\n", "unknown config key"), ("[1, 2]\n", "mapping"),
                        ("batchnorm:\n  model: {head_hidden: 8}\n", "built-in"), ("a: {b: [\n", "YAML")]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=match) as e:  # AblationError is a ConfigError
            ablations.load_ablations_file(f)
        assert str(f) in str(e.value)
