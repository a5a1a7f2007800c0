"""Drive pure plans with tables of (operation expected, result fed), honcho/h11 style."""

from __future__ import annotations

from llmuxd import states as S
from llmuxd.actions import Now, Pause, Phase, StepFailed, Transition
from llmuxd.catalog import Catalog, DaemonSettings, ModelSpec


def catalog(*specs: ModelSpec, **daemon) -> Catalog:
    settings = DaemonSettings(**{"stop_timeout": 30.0, "drain_timeout": 30.0, **daemon})
    return Catalog(path="/x.toml", files=("/x.toml",), daemon=settings,
                   models={s.name: s for s in specs})


def model(name: str, port: int, level: int = 1, **kw) -> ModelSpec:
    return ModelSpec(name=name, model=f"org/{name}", port=port, sleep_level=level, **kw)


class FakeView:
    def __init__(self, cat: Catalog, states: dict[str, str], asleep_levels: dict | None = None):
        self.catalog = cat
        self.runtimes = {n: S.Runtime(n, state=states.get(n, S.STOPPED)) for n in cat.models}
        for n, lvl in (asleep_levels or {}).items():
            self.runtimes[n].asleep_level = lvl

    def states(self) -> dict[str, str]:
        return {n: rt.state for n, rt in self.runtimes.items()}


class T:
    """Matches a Transition by model and state; `error` is a substring to find."""

    def __init__(self, model: str, state: str, error: str | None = None):
        self.model, self.state, self.error = model, state, error

    def matches(self, op) -> bool:
        return (isinstance(op, Transition) and op.model == self.model and op.state == self.state
                and (self.error is None or (op.error or "").find(self.error) >= 0))

    def __repr__(self) -> str:
        return f"T({self.model}, {self.state}, {self.error!r})"


def run_table(view: FakeView, plan, table):
    """Feed `table` to `plan`; Now and Phase are answered here (a fake clock that
    advances with Pause). Transitions are applied to the view as the daemon would.
    Returns ("ok", value, phases) or ("failed", message, phases)."""
    clock = 0.0
    phases = []
    rows = list(table)
    result = None
    step = 0
    while True:
        try:
            op = plan.send(result)
        except StopIteration as stop:
            assert step == len(rows), f"plan ended early; unused rows: {rows[step:]}"
            return "ok", stop.value, phases
        except StepFailed as exc:
            assert step == len(rows), f"plan failed early ({exc}); unused rows: {rows[step:]}"
            return "failed", str(exc), phases
        if isinstance(op, Now):
            result = clock
            continue
        if isinstance(op, Phase):
            phases.append((op.name, op.model))
            result = None
            continue
        assert step < len(rows), f"plan went on past the table with {op!r}"
        expected, result = rows[step]
        step += 1
        if isinstance(expected, T):
            assert expected.matches(op), f"row {step}: expected {expected!r}, got {op!r}"
        elif isinstance(expected, type):
            assert isinstance(op, expected), f"row {step}: expected {expected.__name__}, got {op!r}"
        else:
            assert op == expected, f"row {step}: expected {expected!r}, got {op!r}"
        if isinstance(op, Transition):
            S.advance(view.runtimes[op.model], op.state, op.error, **op.fields)
        if isinstance(op, Pause):
            clock += op.seconds
