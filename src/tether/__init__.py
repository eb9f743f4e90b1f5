"""tether: train language models from human preferences.

    import tether
    tether.sft(model="base", data=[{"prompt": "Hi", "completion": "Hello."}], out="runs/sft")   # docs/python-api.md
"""

from tether.api import bon, dpo, dpo_online, evaluate, grpo, ppo, rm, run, sft
from tether.config import load_config

__version__ = "0.1.0"
__all__ = ["bon", "dpo", "dpo_online", "evaluate", "grpo", "load_config", "ppo", "rm", "run", "sft"]
