"""The trainer actor: failures end as clear results and never take the fleet down; results are idempotent."""

import trio

from actors.runtime import ActorSystem
from actors.trainer import Trainer
from bus.blackboard import Blackboard
from bus.messages import TrainRequest, TrainResult


async def test_unknown_recipe_and_failing_recipe_end_with_clear_errors(tmp_path):
    board = Blackboard(tmp_path / "bb")
    async with trio.open_nursery() as nursery:
        system = ActorSystem(nursery)
        trainer = await system.spawn("trainer", lambda: Trainer(board, tmp_path))
        r = await trainer.ask(TrainRequest(job_id="j1", agent="a", task="pusht", recipe="magic"))
        assert isinstance(r, TrainResult) and not r.ok and "unknown recipe 'magic'" in r.error
        # no episodes recorded: the recipe process fails, the result says why in one line
        r = await trainer.ask(TrainRequest(job_id="j2", agent="a", task="pusht", recipe="bc", time_budget_s=60),
                              timeout=120)
        assert not r.ok and r.error.startswith("recipe failed") and "\n" not in r.error
        again = await trainer.ask(TrainRequest(job_id="j2", agent="a", task="pusht", recipe="bc"))
        assert again == r  # answered from the record, not run twice
        nursery.cancel_scope.cancel()
