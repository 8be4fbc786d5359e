"""bench/overhead.py with Ray Tune's default reuse_actors=False: the other arm of the A/B of worker reuse.

    python bench/overhead_no_reuse.py --baseline BASELINE --data DATA --out OUT.json   (same arguments)
"""
import runpy
import sys
from pathlib import Path

from ray import tune

_tune_config = tune.TuneConfig


def _without_reuse(*args, **kwargs):
    kwargs["reuse_actors"] = False
    return _tune_config(*args, **kwargs)


tune.TuneConfig = _without_reuse  # tune/search.py looks it up on the module when it builds the Tuner
sys.argv = [str(Path(__file__).with_name("overhead.py")), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
