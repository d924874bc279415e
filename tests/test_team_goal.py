"""When does an agent stop searching because the team's champion is at the target?"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from bus.messages import PolicySpec
from bus.records import Champion
from enpire.agents import budget


@dataclass
class _Tools:
    current: Champion | None
    state: str = ""  # the judge's announced state of the confirmation ("" it leads)

    def champion(self) -> Champion | None:
        return self.current

    def confirmation(self) -> str:
        return self.state


def _champion(judged=(10, 10), confirmed=(0, 0), decision="") -> Champion:
    return Champion("pusht", PolicySpec(commit="c0ffee", params={}), judged[0], judged[1], 0.0,
                    successes=confirmed[0], n=confirmed[1], decision=decision)


@pytest.mark.parametrize("champion, met", [
    (None, False),
    (_champion(), True),                                    # judged at the target, confirmation just started
    (_champion(judged=(7, 10)), False),                     # judged below the target
    (_champion(confirmed=(46, 52)), True),                  # 0.885 so far, rule still running
    (_champion(confirmed=(12, 40)), False),                 # confirmation disagrees
    (_champion(confirmed=(46, 52), decision="not_met"), False),  # the rule stopped it: the team works on
    (_champion(confirmed=(104, 104), decision="met"), True),
])
def test_a_champion_the_sequential_rule_turned_down_no_longer_stops_the_team(champion, met):
    assert budget.team_goal_met(_Tools(champion), 0.8) is met


@pytest.mark.parametrize("champion, met", [
    (_champion(judged=(82, 100)), False),                   # at the target but inside the margin
    (_champion(judged=(84, 100)), True),
    (_champion(judged=(84, 100), confirmed=(30, 40)), True),    # 0.75: too few episodes to overrule
    (_champion(judged=(84, 100), confirmed=(37, 50)), False),   # 0.74 after 50: confirmation disagrees
])
def test_the_builtin_agents_margin_and_confirmation_count(champion, met):
    assert budget.team_goal_met(_Tools(champion), 0.8, margin=0.03, confirm_after=50) is met


def test_no_target_is_never_met():
    assert budget.team_goal_met(_Tools(_champion()), 0.0) is False


def test_a_confirmation_the_judge_finds_unlikely_does_not_hold_the_team():
    """Judged at the target, confirmed at it so far, but off course (the judge runs it on idle cells only):
    the team searches on instead of waiting for a confirmation that will likely stop short."""
    champion = _champion(judged=(37, 40), confirmed=(10, 10))
    assert budget.team_goal_met(_Tools(champion, ""), 0.9) is True
    assert budget.team_goal_met(_Tools(champion, "unlikely"), 0.9) is False
    assert budget.team_goal_met(_Tools(champion, "not_met"), 0.9) is False
