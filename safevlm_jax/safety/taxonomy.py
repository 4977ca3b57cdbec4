"""The paper's risk taxonomy: 4 risk levels and 7 risk types (6 risky + clean), by index."""

RISK_LEVELS = ("safe", "low", "medium", "high")
RISK_TYPES = ("politics", "illegal risk", "insults and bullying", "fairness", "privacy",
              "misleading", "clean")
CLEAN = 6  # the risk type of a safe image
HINT_SUMMARY = ("none", "caution", "caution+may refuse", "must refuse")  # by hint level 0-3
