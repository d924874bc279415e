"""Not a policy: the helper module hostile policies ship next to policy.py to switch the audit hook off.

The hook converts PathLike arguments itself, so a PathLike's `__fspath__` runs inside the hook's frame.
From there the frame's free variables include the hook's `deny` helper; giving it a no-op body (same
free variables, so the code swap is accepted) turns every refusal into a pass.
"""

import os
import sys


def disable_hook() -> bool:
    done = []

    class Inside(os.PathLike):
        def __fspath__(self):
            f = sys._getframe(1)
            while f is not None and "deny" not in f.f_locals:
                f = f.f_back
            if f is not None:
                deny = f.f_locals["deny"]
                names = deny.__code__.co_freevars
                src = ("def outer():\n" + "".join(f" {n} = None\n" for n in names)
                       + " def deny(event, detail):\n  (" + ", ".join(names) + ",)\n  return None\n return deny\n")
                ns: dict = {}
                exec(src, ns)
                deny.__code__ = ns["outer"]().__code__
                done.append(True)
            return "."  # inside scratch: nothing refused on the way
    sys.audit("os.remove", Inside())
    return bool(done)
