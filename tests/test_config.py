import pytest

from enpire import config as cfg


def test_embedded_default_is_valid():
    c = cfg.Config()
    cfg.check(c)
    assert (c.cells.count, c.agents.count, c.cells.task) == (2, 1, "peg-insert-side-v3")


def test_repository_enpire_toml_is_valid():
    c = cfg.load("enpire.toml")
    assert c.cells.task in c.tasks
    assert c == cfg.Config(), "enpire.toml says it shows the embedded defaults; keep them in step"


@pytest.mark.parametrize(
    "text, key",
    [
        ("[fleet]\nbudget_minutz = 3\n", "fleet"),  # unknown key
        ("[cells]\ncount = 'two'\n", "cells.count"),  # wrong type
        ("[cells]\ncount = -1\n", "cells.count"),  # impossible value
        ("[cells]\ntask = 'stack-blocks'\n", "cells.task"),  # missing task
        ("[tasks.pusht]\nhorizon = 0\n", "tasks.pusht.horizon"),
        ("[tasks.pusht]\nheldout_seeds = {start = 0, count = 500}\n", "tasks.pusht.heldout_seeds"),
        ("[fleet]\ntarget = 1.5\n", "fleet.target"),
    ],
)
def test_bad_config_gives_one_line_naming_the_key(text, key):
    with pytest.raises(cfg.ConfigError) as err:
        cfg.decode(text, "enpire.toml")
    message = str(err.value)
    assert message.startswith("enpire.toml: ") and key in message and "\n" not in message


def test_unknown_key_is_named():
    with pytest.raises(cfg.ConfigError, match="budget_minutz"):
        cfg.decode("[fleet]\nbudget_minutz = 3\n", "enpire.toml")


def test_command_line_overrides_are_validated():
    c = cfg.with_overrides(cfg.Config(), **{"cells.count": 4, "fleet.target": None})
    assert c.cells.count == 4 and c.fleet.target == 0.9
    with pytest.raises(cfg.ConfigError, match="cells.count"):
        cfg.with_overrides(cfg.Config(), **{"cells.count": -2})


def test_print_config_round_trips():
    c = cfg.Config()
    assert cfg.decode(cfg.to_toml(c)) == c
