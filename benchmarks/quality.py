"""Quality benchmark: `mft compare` with the repo's profiles, into docs/results/.

    python -m benchmarks.quality --profile cpu --skip frontier,fidelity,low-data  # 2 Xeon cores: FT, MFT; ~1.5 hours
    python -m benchmarks.quality --profile cpu --skip tail-samples,fidelity,low-data  # then the frontier; ~1.8 hours
    python -m benchmarks.quality --profile cpu  # then the sampled-tail frontier line, fidelity, low data; ~1.5 hours
    python -m benchmarks.quality --profile gpu --methods FT,MFT --skip frontier,fidelity,low-data  # one CUDA GPU (docs/gpu-check.md)
    python -m benchmarks.quality --model path/to/model.gguf --methods FT,MFT --skip fidelity
    python -m benchmarks.quality --profile quick --families FT,MFT --taus 0.25 --lrs 3e-5  # the fair frontier's CPU size, one lr

Every other option is `mft compare`'s (`mft compare --help`; the fair frontier's commands are in
docs/frontier.md). The results file is docs/results/quality-<profile>[-<model>][-lr<lr>].md
(frontier-<profile>-<domains>.md for the fair frontier), with runs.csv and the plots in the folder of
the same name; a reading written by hand goes beside it, in quality-<profile>.reading.md. Corpora,
caches and runs go to .mft-bench/, and finished runs are reused, so a killed benchmark continues
where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import click

from cli.main import mft

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> Path:
    """Run `mft compare` and return the results file's path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu", help="quick, cpu, gpu, or smoke (the tests: a tiny model, seconds)")
    parser.add_argument("--work", default=os.path.relpath(ROOT / ".mft-bench"), help="models, corpora, caches and runs")
    parser.add_argument("--results", default=os.path.relpath(ROOT / "docs" / "results"), help="the results file's folder")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    command = ["compare", "--profile", args.profile, "--out", args.results, "--work", args.work, *rest]
    try:
        return mft.main(command, prog_name="mft", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
