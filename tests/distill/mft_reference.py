"""The spec's correction weight, written out independently of the package (float64 reference for tests)."""


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
