"""One round end to end: plan -> driver -> checks, and its printed report."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.chaos.checks import Violation, check, figures
from tests.chaos.driver import ChaosStack, Outcome, Round
from tests.chaos.schedule import RoundPlan


@dataclass
class Verdict:
    plan: RoundPlan
    outcome: Outcome
    violations: list[Violation]
    figures: dict[str, Any]

    def report(self) -> str:
        lines = [self.plan.describe(), "  applied:"]
        for a in self.outcome.applied:
            lines.append(f"    {a.fault.describe()} -> {a.resolved or '-'} {a.note}".rstrip())
        lines.append(f"  figures: {self.figures}")
        for p in self.outcome.problems:
            lines.append(f"  driver: {p}")
        if self.violations:
            lines.append(f"  VIOLATIONS ({len(self.violations)}) seed={self.plan.seed}:")
            lines += [f"    {v}" for v in self.violations[:40]]
            if len(self.violations) > 40:
                lines.append(f"    ... {len(self.violations) - 40} more")
        else:
            lines.append("  every invariant held")
        return "\n".join(lines)


async def play(
    stack: ChaosStack, plan: RoundPlan, *, tag: str, logs: Path, settle: float = 90.0
) -> Verdict:
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
    rnd = Round(stack, plan, tag=tag, logs=logs, settle=settle)
    outcome = await rnd.run()
    violations = check(outcome)
    if not violations:
        await rnd.drop()  # a failed round's database stays for a look
    return Verdict(plan, outcome, violations, figures(outcome))
