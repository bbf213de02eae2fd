"""The warm starts of the comparisons (configs/repro/common.py): `--config configs/repro/warm_start.py:<kind>`
with kind multi | single | shared | weak_sub.

    python launch/warm_start.py --config configs/repro/warm_start.py:single --workdir runs/repro/warm_single
"""
from configs.repro.common import warm_start_config


def get_config(kind: str = "multi"):
    return warm_start_config(kind)
