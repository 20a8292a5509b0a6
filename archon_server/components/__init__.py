"""Components: the node types of an architecture graph."""

from .base import Component, ComponentContext, ComponentFailed, FinalOverrides, ParseError
from .critic import Critic
from .fuser import Fuser
from .generator import Generator
from .ranker import Ranker
from .scorer import Scorer
from .self_moa_seq import SelfMoASeq
from .unit_tests import UnitTestEvaluator, UnitTestGenerator
from .verifier import Verifier
from .vote import Vote

COMPONENTS: dict[str, type[Component]] = {
    c.type: c for c in (Generator, Fuser, Ranker, Critic, Verifier, UnitTestGenerator, UnitTestEvaluator, SelfMoASeq, Vote, Scorer)
}

__all__ = ["COMPONENTS", "Component", "ComponentContext", "ComponentFailed", "FinalOverrides", "ParseError"]
