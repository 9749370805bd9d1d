"""A symbolic dimension for launch-config tests: stands in for a batch / length that TensorRT only knows at run
time (its ShapeExpr), records + - * // and is evaluated later with concrete values."""


class Sym:
    def __init__(self, fn):
        self.fn = fn

    @staticmethod
    def var(name):
        return Sym(lambda env: env[name])

    def _op(self, other, f):
        o = other if isinstance(other, Sym) else Sym(lambda env, v=other: v)
        return Sym(lambda env: f(self.fn(env), o.fn(env)))

    def __add__(self, o):
        return self._op(o, lambda a, b: a + b)

    def __sub__(self, o):
        return self._op(o, lambda a, b: a - b)

    def __mul__(self, o):
        return self._op(o, lambda a, b: a * b)

    __rmul__ = __mul__

    def __floordiv__(self, o):
        return self._op(o, lambda a, b: a // b)

    def __bool__(self):
        raise TypeError("a symbolic dimension has no truth value")


def ev(x, env):
    """Evaluate a Sym (or pass a plain number through) for the concrete sizes in ``env``."""
    return x.fn(env) if isinstance(x, Sym) else x
