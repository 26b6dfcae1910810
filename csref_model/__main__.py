"""python -m csref_model COMMAND [ARGS]: ground, export, benchmark or retrieve (COMMAND --help for each)."""

import sys

from csref_model.cli import USER_ERROR, benchmark, export, ground, retrieve

COMMANDS = {"ground": ground.main, "export": export.main, "benchmark": benchmark.main, "retrieve": retrieve.main}
USAGE = ("usage: python -m csref_model {" + ",".join(COMMANDS) + "} [ARGS]\n"
         "  ground     ground one spoken referring expression in one image\n"
         "  export     export SREC to ONNX graphs (and TensorRT engines)\n"
         "  benchmark  latency of the Grounder's calls on one backend\n"
         "  retrieve   rank images by a spoken description (ResDAVEnet-VQ)\n"
         "`python -m csref_model COMMAND --help` describes a command's arguments.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        if argv:
            print(f"error: unknown command {argv[0]!r}", file=sys.stderr)
        return USER_ERROR
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
