"""Writes outside its scratch directory: next to it in the state directory, then /tmp."""


class Policy:
    def __init__(self, params):
        pass

    def act(self, obs):
        for path in ("../outside.txt", "/tmp/enpire_sandbox_pwned.txt"):
            try:
                with open(path, "w") as f:
                    f.write("pwned")
            except Exception:  # noqa: BLE001, S110
                pass
        return [256.0, 256.0]
