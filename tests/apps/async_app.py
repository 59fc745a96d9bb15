"""An async pipeline for the real-supervisor test of async steps (tests/test_async.py)."""
import asyncio

import ductwork


async def sleepy(seconds):
    await asyncio.sleep(seconds)
    return {"slept": seconds, "step": ductwork.current_step().step_id}


class SupAsync(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(sleepy)
