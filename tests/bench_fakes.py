"""A scripted upstream for bench tests: answers benchmark prompts and judge prompts deterministically.

It is no oracle: it answers MATH with the digits it can see, MMLU with "A", HumanEval with the
prompt's own signature and `pass`; judges give fixed, parseable verdicts.  Every call is counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re

from archon_server.backends.base import Backend, ChatRequest, ChatResult, Choice, TokenLogprob, Usage


class ScriptedUpstream(Backend):
    name = "scripted"

    def __init__(self, delay_s: float = 0.0):
        self.calls = 0
        self.delay_s = delay_s

    def _answer(self, messages: list[dict]) -> str:
        last = messages[-1]["content"]
        h = int(hashlib.sha256(str(messages).encode()).hexdigest()[:8], 16)
        if "## Best Model Identifier" in last:
            return "M" if h % 2 else "m"
        if "[[rating]]" in last:
            return f"Reasonable. Rating: [[{h % 10 + 1}]]"
        if "<|User Prompt|>" in last:
            return "My verdict: [[A=B]]"
        if "\\boxed{}" in last:
            nums = re.findall(r"\d+", last)
            return f"The answer is \\boxed{{{nums[-1] if nums else 0}}}."
        if "```python" in last:
            sig = re.search(r"def .*?:\n", last)
            return f"```python\n{sig.group(0) if sig else 'def f():'}    pass\n```"
        return f"Answer #{h % 97} to: {last[:60]}"

    async def chat(self, request: ChatRequest) -> ChatResult:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        choices = []
        for i in range(request.params.n):
            text = self._answer(request.messages)
            if i:
                text += f" (sample {i})"
            lp = None
            if request.params.logprobs and text in ("m", "M"):
                other = "m" if text == "M" else "M"
                lp = [TokenLogprob(text, math.log(0.7), [(text, math.log(0.7)), (other, math.log(0.3))])]
            choices.append(Choice(text, index=i, logprobs=lp))
        return ChatResult(choices, Usage(sum(len(m["content"]) for m in request.messages) // 4, 10 * len(choices)), request.model)


def make_registry(upstream: ScriptedUpstream):
    from archon_server.backends.registry import BackendRegistry

    reg = BackendRegistry()
    reg.register("scripted", upstream, "scripted-model", aliases=["judge", "default", "aggregator", "proposer-1", "proposer-2"])
    return reg
