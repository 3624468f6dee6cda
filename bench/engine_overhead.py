"""Framework cost per transition against raw ``transitions.Machine`` triggers.

Both run the same cyclic path (a -> b -> c -> a ...) for N transitions in the same
process: the baseline fires ``model.trigger(name)`` on a plain ``transitions.Machine``;
the framework runs a declared spec through the trio runner with trivial activities
(each returns its event at once), including cancel scopes, deadlines and trace
records. Prints transitions/s for both and the ratio. Run: python bench/engine_overhead.py
[--transitions 30000] [--json OUT]
"""

from __future__ import annotations

import sys
import time

import attrs
import trio
from common import emit, row
from transitions import Machine

from clusterfsm.fsm import ErrorState, Runner, State, StateTimeout, Transition, machine_spec

N = 30_000


@attrs.frozen(auto_exc=True)
class Slow(StateTimeout):
    """Deadline error for the bench machine."""


def build_spec(n: int) -> object:
    counter = {"left": n}

    async def step(event: str) -> str:
        counter["left"] -= 1
        return "stop" if counter["left"] <= 0 else event

    async def a(_ctx: object) -> str:
        return await step("ab")

    async def b(_ctx: object) -> str:
        return await step("bc")

    async def c(_ctx: object) -> str:
        return await step("ca")

    return machine_spec(
        "bench",
        initial="a",
        states=[State("a", a, deadline=10, on_timeout=Slow),
                State("b", b, deadline=10, on_timeout=Slow),
                State("c", c, deadline=10, on_timeout=Slow), State("done")],
        transitions=[Transition("a", "ab", "b"), Transition("b", "bc", "c"),
                     Transition("c", "ca", "a"), Transition("a", "stop", "done"),
                     Transition("b", "stop", "done"), Transition("c", "stop", "done")],
        errors=[ErrorState("slow", Slow)],
    )


def raw_transitions(n: int) -> float:
    class Model:
        pass

    model = Model()
    Machine(model=model, states=["a", "b", "c"], initial="a", auto_transitions=False,
            transitions=[["ab", "a", "b"], ["bc", "b", "c"], ["ca", "c", "a"]])
    triggers = ["ab", "bc", "ca"]
    start = time.perf_counter()
    for i in range(n):
        model.trigger(triggers[i % 3])  # type: ignore[attr-defined]
    return time.perf_counter() - start


def framework(n: int) -> float:
    spec = build_spec(n)

    async def main() -> float:
        start = time.perf_counter()
        out = await Runner(spec, None).run()  # type: ignore[arg-type]
        elapsed = time.perf_counter() - start
        assert out.state == "done" and len(out.records) == n
        return elapsed

    return trio.run(main)


def measure(n: int) -> list[dict[str, object]]:
    raw_transitions(2000)
    framework(2000)  # warm up both
    raw = min(raw_transitions(n) for _ in range(3))
    ours = min(framework(n) for _ in range(3))
    print(f"transitions per run: {n} (best of 3)")
    print(f"raw transitions.Machine trigger : {n / raw:12,.0f} transitions/s "
          f"({raw / n * 1e6:6.2f} us each)")
    print(f"fsm Runner on trio (activities) : {n / ours:12,.0f} transitions/s "
          f"({ours / n * 1e6:6.2f} us each)")
    print(f"ratio framework/raw cost per transition: {ours / raw:.2f}x")
    return [row("Engine: transitions/s through the trio Runner (trivial activities)",
                f"{n / ours:,.0f}/s ({ours / n * 1e6:.1f} us each)",
                f"raw transitions.Machine {n / raw:,.0f}/s", f"{ours / raw:.2f}x the cost",
                ">= 20,000/s", n / ours >= 20_000)]


def main(argv: list[str]) -> None:
    n = int(argv[argv.index("--transitions") + 1]) if "--transitions" in argv else N
    emit(measure(n), argv)


if __name__ == "__main__":
    main(sys.argv[1:])
