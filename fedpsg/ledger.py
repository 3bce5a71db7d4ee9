"""Show a party's lifetime privacy ledger, or reset it (only when asked).

python -m fedpsg.ledger PARTY_DIR                      # releases, total (epsilon, delta), what is left
python -m fedpsg.ledger PARTY_DIR --reset --dataset D  # start a fresh ledger (explicit only)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedpsg.budget.ledger import Ledger
from fedpsg.budget.policy import PartyPolicy, load_policy


def describe(ledger: Ledger, policy: PartyPolicy) -> str:
    """The ledger as a user reads it: one line per release, the total and what is left."""
    entries = ledger.entries()
    lines = [f"ledger {ledger.path} ({len(entries)} releases)"]
    for e in entries:
        p = e.privacy
        own = f"eps {p.epsilon:.4g}" if e.private else "NON-PRIVATE"
        lines.append(
            f"  {e.time}  {e.status:8s} {e.purpose}: {e.method}, sigma {p.noise_multiplier:.4g}, "
            f"q {p.sample_rate:.4g}, {p.steps} steps, {p.adjacency}, {own} at delta {p.delta:g}"
        )
    spent = ledger.spent(policy.delta, entries)
    lines.append(f"total: epsilon {spent:.4f} at delta {policy.delta:g} (RDP curves composed)")
    lines.append(f"budget: epsilon {policy.epsilon:g} at delta {policy.delta:g}; left: {policy.epsilon - spent:.4f}")
    non_private = sum(not e.private for e in entries)
    if non_private:
        lines.append(f"{non_private} non-private answers (trust_coordinator): no DP guarantee against the coordinator")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpsg.ledger", description=__doc__.split("\n\n")[0])
    parser.add_argument("party_dir", type=Path, help="the party's folder (<state dir>/party-<partition>)")
    parser.add_argument("--dataset", default=None, help="one ledger (default: every ledger in the folder)")
    parser.add_argument("--policy", default=None, help="policy file (default: the party's own, as the party reads it)")
    parser.add_argument("--reset", action="store_true", help="delete the ledger of --dataset (its history is lost)")
    args = parser.parse_args(argv)
    try:
        policy = load_policy(args.policy, args.party_dir)
    except ValueError as err:
        parser.error(str(err))
    if args.reset:
        if args.dataset is None:
            parser.error("--reset needs --dataset: ledgers are reset one at a time")
        Ledger(args.party_dir, args.dataset).reset()
        print(f"reset the {args.dataset} ledger of {args.party_dir}")
        return 0
    datasets = [args.dataset] if args.dataset else sorted(p.name[7:-5] for p in args.party_dir.glob("ledger-*.json"))
    if not datasets:
        print(f"no ledger in {args.party_dir}", file=sys.stderr)
        return 1
    for dataset in datasets:
        print(describe(Ledger(args.party_dir, dataset), policy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
