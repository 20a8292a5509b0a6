"""Every prompt of every component, in one place (wording follows Together MoA and Archon)."""

import json
from typing import Any

FUSER_SYSTEM = (
    "You have been provided with a set of responses from various models to the latest user query. "
    "Your task is to synthesize these responses into a single, high-quality response. It is crucial to critically "
    "evaluate the information provided in these responses, recognizing that some of it may be biased or incorrect. "
    "Your response should not simply replicate the given answers but should offer a refined, accurate, and "
    "comprehensive reply to the instruction. Ensure your response is well-structured, coherent, and adheres to the "
    "highest standards of accuracy and reliability.\n\nResponses from models:"
)
JSON_OBJECT = "Your final response must be a single JSON object and nothing else: no prose, no code fences."
JSON_SCHEMA = (
    "Your final response must be a single JSON value that validates against this JSON Schema, and nothing else "
    "(no prose, no code fences):\n{schema}"
)


def json_instruction(response_format: dict[str, Any]) -> str:
    """What a stage whose output must be JSON is told (OpenAI's `response_format`: json_object or json_schema)."""
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
        return JSON_SCHEMA.format(schema=json.dumps(schema, ensure_ascii=False))
    return JSON_OBJECT


TOOLS_NOTE = (
    "The final answer to this conversation may call these tools (a later stage calls them; you answer in text):\n{tools}"
)


def tools_note(tools: list[dict[str, Any]]) -> str:
    """The request's tools as text, for inner layers of an architecture with `tools_in_prompt`."""
    lines = []
    for t in tools:
        fn = t.get("function") or {}
        params = json.dumps(fn.get("parameters") or {}, ensure_ascii=False)
        lines.append(f"- {fn.get('name', '')}: {fn.get('description', '')} parameters: {params}")
    return TOOLS_NOTE.format(tools="\n".join(lines))


FUSER_CRITIQUE = "\nCritique of this response:\n{critique}"
FUSER_LENGTH = "\n\nKeep your final response to about {words} words."

RANKER = (
    "I will provide you with {n} responses, each indicated by a numerical identifier []. "
    "Rank the responses based on their relevance to the instruction: {query}\n\n{responses}\n\n"
    "Instruction: {query}\n\n"
    "Rank the {n} responses above based on their relevance to the instruction. All the responses should be included "
    "and listed using identifiers, in descending order of relevance to the instruction. The output format should be "
    "[] > [], e.g., [4] > [2]. Only respond with the ranking results, do not say any word or explain."
)

CRITIC = (
    "Here is an instruction and a response to it.\n\nInstruction: {query}\n\nResponse:\n{response}\n\n"
    "Evaluate the response. Give its strengths and its weaknesses, in this exact format:\n"
    "Strengths:\n- ...\nWeaknesses:\n- ..."
)

VERIFIER = (
    "Here is an instruction and a proposed response.\n\nInstruction: {query}\n\nResponse:\n{response}\n\n"
    "Think step by step about whether the response is correct and fully answers the instruction. "
    "Then, on the last line, write exactly [Correct] if it is correct or [Incorrect] if it is not."
)

UNIT_TEST_GENERATOR = (
    "Here is an instruction.\n\nInstruction: {query}\n\n"
    "Write {k} unit tests: short, concrete, checkable statements that a correct and complete response must satisfy. "
    "Write one per line, each starting with '- '. Do not write anything else."
)

UNIT_TEST_GENERATOR_ASSERT = (
    "Here is a programming task.\n\nTask: {query}\n\n"
    "Write {k} unit tests for a correct solution, each a single-line Python assert statement calling the "
    "function the task asks for. Write one per line, each starting with '- '. Do not write anything else."
)

UNIT_TEST_EVALUATOR = (
    "Here is an instruction, a response and a list of unit tests.\n\nInstruction: {query}\n\nResponse:\n{response}\n\n"
    "Unit tests:\n{tests}\n\nFor each unit test, in order, decide whether the response satisfies it. "
    "Answer with one line per test, in the format 'Test <number>: [Passed]' or 'Test <number>: [Failed]'."
)

SELF_MOA_SEQ_SYSTEM = (
    "You have been provided with a set of responses to the latest user query. The first response is the best "
    "synthesis so far. Synthesize all of them into a single response that is better than each: keep what is correct, "
    "fix what is wrong, and add what is missing.\n\nResponses:"
)

CRITIC_JOINT = (
    "I will provide you with {n} responses, each indicated by a numerical identifier []. "
    "Evaluate the strengths and weaknesses of each response to the instruction: {query}\n\n{responses}\n\n"
    "Instruction: {query}\n\nFor each of the {n} responses, in order, write its identifier followed by its "
    "strengths and weaknesses, in this exact format:\n[1]\nStrengths:\n- ...\nWeaknesses:\n- ...\n\n[2]\n..."
)

# Scorer (logprob judges): the verdict is read from the next token's log-probabilities, never parsed from text.
# Pairwise wording after AlpacaEval's clf judge: the answer is "(a)" or "(b)"; the assistant turn is opened with
# "Output (" so the very next token is the verdict.
PAIRWISE_JUDGE = (
    "Select the output (a) or (b) that best matches the given instruction. Choose your preferred output, which can be "
    "subjective. Your answer should ONLY contain: Output (a) or Output (b).\n\n"
    "# Instruction:\n{query}\n\n# Output (a):\n{a}\n\n# Output (b):\n{b}\n\n"
    "# Which is best, Output (a) or Output (b)?"
)
PAIRWISE_PREFIX = "Output ("
POINTWISE_JUDGE = (
    "Rate the response to the instruction below on a scale of 1 to 10, where 1 is useless and 10 is excellent "
    "(helpful, correct, complete and clear). Answer with the number only.\n\n"
    "# Instruction:\n{query}\n\n# Response:\n{response}\n\n# Rating (1-10):"
)
POINTWISE_PREFIX = "Rating: "
