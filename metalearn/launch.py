"""`python -m metalearn.launch`: PyTorch's launcher (torchrun) with metalearn's exit codes.

    python -m metalearn.launch --nproc_per_node 2 train CONFIG.yaml [key=value ...]
    python -m metalearn.launch --nproc_per_node 2 -m metalearn train CONFIG.yaml ...   # the same

Takes every torchrun option (`python -m metalearn.launch --help`); a bare metalearn command (`train`,
`eval`) in place of the script means `-m metalearn COMMAND`. It runs `torch.distributed.run` in this
process and changes only how it ends:

* SIGINT/SIGTERM (also SIGHUP/SIGQUIT) to the launcher: torchrun forwards the signal to the workers,
  which finish their step, save a checkpoint and exit; then the launcher prints one line and exits
  128 + the signal number (130 for SIGINT, 143 for SIGTERM), like `metalearn train` in one process.
  Plain `torchrun` ends with its own traceback and exit 1.
* A worker that ended because of a signal (the first failure was exit 130/143, or killed by one):
  the same one line and 128 + signal number.
* Any other failure: the workers' own messages (`metalearn: error: ...`) stay above; the launcher adds
  one line naming the first rank that failed and exits with that rank's exit code (1 if it has none
  in 1..255), never with a traceback.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import List, Optional

COMMANDS = ("train", "eval")
"""metalearn commands that can be given without `-m metalearn`."""

_SIGNAL_EXITS = {128 + s: s for s in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)}


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _stopped(sig: int, how: str) -> int:
    print(f"metalearn.launch: {_signal_name(sig)}: {how} (exit {128 + int(sig)})", file=sys.stderr)
    return 128 + int(sig)


def _raise_signal(signum, frame):  # before torchrun installs its own handler (same exception type)
    from torch.distributed.elastic.multiprocessing.api import SignalException

    raise SignalException(f"got signal {_signal_name(signum)}", sigval=signal.Signals(signum))


def main(argv: Optional[List[str]] = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

    signal.signal(signal.SIGTERM, _raise_signal)  # torchrun replaces it once the workers start
    try:
        args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)  # argparse errors: exit 2
        if (not args.module and not args.no_python and args.training_script in COMMANDS
                and not Path(args.training_script).exists()):
            args.module, args.training_script_args = True, [args.training_script, *args.training_script_args]
            args.training_script = "metalearn"
        record(torchrun.run)(args)  # = torchrun.main(argv), with the bare-command shorthand
        return 0
    except SignalException as e:
        return _stopped(int(e.sigval), "the launcher stopped its processes")
    except KeyboardInterrupt:  # SIGINT before torchrun's handler was installed
        return _stopped(int(signal.SIGINT), "the launcher stopped")
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code < 0 or code in _SIGNAL_EXITS:  # killed by a signal, or stopped by one and exited 128 + N
            sig = -code if code < 0 else int(_SIGNAL_EXITS[code])
            return _stopped(sig, f"rank {rank} stopped")
        print(f"metalearn.launch: error: rank {rank} exited with {code} "
              f"({len(e.failures)} of the processes failed; their messages are above)", file=sys.stderr)
        return code if 0 < code < 256 else 1
    except Exception as e:  # rendezvous, ports, a missing script: one line
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"metalearn.launch: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
