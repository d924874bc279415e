import pytest
import trio

from actors.runtime import Actor, ActorStartError, ActorSystem, RestartPolicy
from bus.messages import Ack, Failure, NoWork


class Flaky(Actor):
    """Crashes on its first message after each start; counts its starts."""

    name = "flaky"
    starts = 0

    async def setup(self):
        Flaky.starts += 1
        self.crash_next = True

    async def handle(self, msg):
        if self.crash_next:
            self.crash_next = False
            raise RuntimeError("boom")
        return NoWork(retry_after_s=Flaky.starts)


async def test_crashed_actor_is_restarted_and_keeps_its_address():
    Flaky.starts = 0
    async with trio.open_nursery() as nursery:
        system = ActorSystem(nursery, RestartPolicy(initial_s=0.01))
        ref = await system.spawn("flaky", Flaky)
        first = await ref.ask(Ack())
        assert isinstance(first, Failure) and "boom" in first.error  # the asker is told, not left hanging
        again = await ref.ask(Ack())  # same ref, new instance: it crashes once more on its first message
        assert isinstance(again, Failure)
        with trio.fail_after(5):
            while Flaky.starts < 3:
                await trio.sleep(0.01)
        assert system.actors["flaky"].restarts == 2
        assert system.actors["flaky"].last_error == "RuntimeError: boom"
        nursery.cancel_scope.cancel()


class Crasher(Actor):
    name = "crasher"

    async def main(self):
        await trio.sleep(0.01)
        raise ValueError("main loop died")


class Steady(Actor):
    name = "steady"

    async def handle(self, msg):
        return Ack(detail="fine")


async def test_one_crashing_actor_does_not_take_down_the_others():
    async with trio.open_nursery() as nursery:
        system = ActorSystem(nursery, RestartPolicy(initial_s=0.01, max_s=0.02))
        await system.spawn("crasher", Crasher)
        steady = await system.spawn("steady", Steady)
        await trio.sleep(0.3)
        assert system.actors["crasher"].restarts >= 3
        assert (await steady.ask(Ack())).detail == "fine"
        nursery.cancel_scope.cancel()


def test_backoff_grows_and_caps():
    p = RestartPolicy(initial_s=0.1, max_s=1.0)
    assert [p.delay(i) for i in (1, 2, 3, 4, 5, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


class LongPoller(Actor):
    """Concurrent handlers: 'wait' parks (a long-poll), 'crash' raises."""

    name = "poller"
    concurrent_handlers = True

    async def handle(self, msg):
        if msg.detail == "crash":
            raise RuntimeError("handler died")
        await trio.sleep_forever()


async def test_a_crashing_handler_s_siblings_answer_their_callers_at_once():
    replies = []
    async with trio.open_nursery() as nursery:
        system = ActorSystem(nursery, RestartPolicy(initial_s=0.01))
        ref = await system.spawn("poller", LongPoller)

        async def wait_one():
            replies.append(await ref.ask(Ack(detail="wait"), timeout=30.0))

        for _ in range(3):
            nursery.start_soon(wait_one)
        await trio.sleep(0.05)  # the three long-polls are parked in their handlers
        began = trio.current_time()
        crashed = await ref.ask(Ack(detail="crash"))
        with trio.fail_after(2):  # not the callers' own 30 s timeout
            while len(replies) < 3:
                await trio.sleep(0.01)
        assert trio.current_time() - began < 2
        assert isinstance(crashed, Failure) and "handler died" in crashed.error
        assert all(isinstance(r, Failure) and r.retry for r in replies), replies
        # the actor was restarted and answers again (the next long-poll parks, so ask a crash)
        assert isinstance(await ref.ask(Ack(detail="crash")), Failure)
        assert system.actors["poller"].restarts >= 1
        nursery.cancel_scope.cancel()


class BadState(Actor):
    """Its setup reads durable state that fails `fails` times (e.g. a damaged record), then works."""

    name = "bad-state"
    fails = 0

    async def setup(self):
        if BadState.fails > 0:
            BadState.fails -= 1
            raise ValueError("table 'jobs' key 'j1': not a valid JobRecord")


async def test_an_actor_that_never_gets_ready_fails_its_spawn_and_a_passing_fault_does_not():
    async with trio.open_nursery() as nursery:
        system = ActorSystem(nursery, RestartPolicy(initial_s=0.01, start_tries=3))
        BadState.fails = 2  # a passing fault: the third setup works
        await system.spawn("passing", BadState)
        assert system.actors["passing"].restarts == 2
        BadState.fails = 10**6  # damaged for good: the start fails at once with the reason, no hang
        with trio.fail_after(5), pytest.raises(ActorStartError, match="^stuck could not start: ValueError: table 'jobs'"):
            await system.spawn("stuck", BadState)
        assert system.actors["stuck"].restarts == 3
        nursery.cancel_scope.cancel()
