r"""Entry point for ``accelerate launch -m mednist_gan.train --config configs/debug.yaml [key=value ...]``.

    mednist-gan train --config configs/debug.yaml                       # one process, CPU or one GPU
    accelerate launch --multi_gpu --num_processes 2 -m mednist_gan.train --config configs/debug.yaml
    accelerate launch --config_file launch/accelerate_multi_node.yaml -m mednist_gan.train \
        --config configs/multi_node.yaml                            # see launch/run.sh --help
"""

import sys

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
