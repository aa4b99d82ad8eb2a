"""The command line: the only place that parses argv. Every command calls a library function.

`commands` builds the parser and runs the training-side commands, `model_commands` those that use a
trained model (export, embed, index, search, serve), `args` the shared argument helpers, `demo` the
embedded end-to-end demo and `ablate` the ablation runner.
"""


def main(argv=None) -> int:
    from .commands import main as _main
    return _main(argv)
