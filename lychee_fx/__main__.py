"""Command line: ``python -m lychee_fx <command> [options]`` (also the ``lychee-fx`` script).

Each command lives in its own module and is imported only when it runs.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help)
COMMANDS = {
    "demo": ("lychee_fx.apps.demo", "compile a model with the backend, generate, compare with full attention"),
    "eval": ("lychee_fx.apps.evaluate", "quality against full attention: passkeys, perplexity, agreement"),
    "learn-roles": ("lychee_fx.learn.cli", "learn a role map with HardKuma gates"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:12s} {text}" for name, (_, text) in COMMANDS.items()]
        print("usage: python -m lychee_fx <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}; expected one of {sorted(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    module, _ = COMMANDS[argv[0]]
    return int(importlib.import_module(module).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
