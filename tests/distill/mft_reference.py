"""The spec's correction and sparse loss, written out independently of the package (float64 references for tests)."""

import torch

from mft_pipeline.labels import IGNORE_INDEX


def reference_weight(p_m: float, p_l: float, right: bool, tau: float, variant: str) -> float:
    """The spec's variant table for one position."""
    if variant == "ft":
        return 1.0
    if right:
        if variant in ("distill+ft", "single-correction"):
            return 0.0
        return 1.0 if p_l == 1.0 else (min(1.0, p_l + tau) - p_l) / (1.0 - p_l)
    if variant == "distill+ft":
        return 1.0
    return (p_m - p_l + tau) / (1.0 + p_m - p_l)


def bucketed_ce(
    student_logits, teacher_logprobs, labels, topk_ids, tau, variant="mft", tail="bucket"
):
    """Sum over positions of the cross-entropy against the sparse target on S = topk + {l}.

    "bucket": the teacher's mass outside S becomes one target entry c_R = (1 - a) r matched
    against the student's total mass outside S. "renormalize": the teacher is rescaled over
    S to sum to 1 before the correction and the tail is dropped.
    """
    q = student_logits.double().softmax(-1)
    p = teacher_logprobs.double().exp()
    total = torch.zeros((), dtype=torch.float64)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            label = int(labels[b, t])
            if label == IGNORE_INDEX:
                continue
            support = sorted(set(topk_ids[b, t].tolist()) | {label})
            outside = [i for i in range(p.shape[-1]) if i not in support]
            teacher = p[b, t].clone()
            if tail == "renormalize":
                teacher = teacher / teacher[support].sum()
            r = max(0.0, 1.0 - float(teacher[support].sum())) if tail == "bucket" else 0.0
            m = int(topk_ids[b, t, 0])
            a = reference_weight(float(teacher[m]), float(teacher[label]), m == label, tau, variant)
            for i in support:
                c_i = (1.0 - a) * teacher[i] + (a if i == label else 0.0)
                total = total - c_i * torch.log(q[b, t, i])
            c_tail = (1.0 - a) * r
            if c_tail > 0 and outside:
                total = total - c_tail * torch.log(q[b, t, outside].sum())
    return total


def dense_mft_ce(student_logits, teacher_logprobs, labels, tau, variant="mft"):
    """Sum over positions of -sum_i c_i log_softmax(z)_i with the dense corrected target c."""
    s = student_logits.double().log_softmax(-1)
    p = teacher_logprobs.double().exp()
    total = torch.zeros((), dtype=torch.float64)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            label = int(labels[b, t])
            if label == IGNORE_INDEX:
                continue
            m = int(p[b, t].argmax())
            a = reference_weight(float(p[b, t, m]), float(p[b, t, label]), m == label, tau, variant)
            target = (1.0 - a) * p[b, t]
            target[label] += a
            total = total - (target * s[b, t]).sum()
    return total
