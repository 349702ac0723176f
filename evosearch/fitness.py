"""Fitness for language-model candidates: KL divergence to the dense model (lower is better).

The fidelity of an evaluation is its number of calibration tokens: EvoPress's
multi-step selection scores many offspring on few tokens and the survivors on more.
"""

from __future__ import annotations

from evosearch.candidate import CandidateModel
from evosearch.evaluate import Teacher


class KLFitness:
    def __init__(self, candidate: CandidateModel, teacher: Teacher, batch_size: int | None = None):
        self.candidate = candidate
        self.teacher = teacher
        self.batch_size = batch_size

    @property
    def max_fidelity(self) -> int:
        return self.teacher.max_tokens

    def __call__(self, assignment: dict, fidelity: int | None = None) -> float:
        self.candidate.apply(assignment)
        return self.teacher.kl(self.candidate.model, tokens=fidelity, batch_size=self.batch_size)
