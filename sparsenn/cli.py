"""The ``sparsenn`` command."""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """examples:
  sparsenn demo                 train, prune to 90%% by gradual magnitude pruning, print the report
  sparsenn demo --sparsity 0.95
  sparsenn list                 the registered methods, patterns, distributions and schedules
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsenn", description="Sparse neural networks on PyTorch.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="train and prune a LeNet-300-100-style MLP on bundled digits",
                          description="Train a LeNet-300-100-style MLP on scikit-learn's 8x8 digits, prune it "
                                      "by gradual magnitude pruning and print the per-layer report.")
    demo.add_argument("--sparsity", type=float, default=0.9, help="target sparsity in [0, 1) (default 0.9)")
    demo.add_argument("--dense-epochs", type=int, default=30)
    demo.add_argument("--prune-epochs", type=int, default=60)
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("list", help="list the registered methods, patterns, distributions, schedules")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            from .demo import run_demo

            if not 0 <= args.sparsity < 1:
                parser.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
            run_demo(sparsity=args.sparsity, dense_epochs=args.dense_epochs, prune_epochs=args.prune_epochs,
                     seed=args.seed)
        elif args.command == "list":
            import sparsenn as sn

            for what, names in [("methods", sn.list_methods()), ("patterns", sn.list_patterns()),
                                ("distributions", sn.list_distributions()), ("schedules", sn.list_schedules())]:
                print(f"{what:<14} {', '.join(names)}")
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"sparsenn: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
